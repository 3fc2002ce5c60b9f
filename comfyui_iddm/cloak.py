"""Cloaks: protect the photos a person publishes against someone else's personalization.

IDDM protects a person who personalizes a model on their own photos. A cloak protects the other
case: it changes each photo, within an L-inf budget eta around the original, so that a model someone
else fine-tunes on the published photos learns the person badly. Every method is one entry of
METHODS (name -> "module:factory", imported on first use; factory(CloakRequest) -> Cloak), so the
CLI (`iddm cloak --method`), the evaluation (`iddm evaluate-protection --method`) and the ComfyUI
node all list and run the same methods:

- aspl:  Anti-DreamBooth's ASPL on the engine's diffusion model (aspl.py);
- rid:   RID's trained network, one forward pass per photo (rid.py; weights from `iddm rid-train`);
- noise: random noise of the same budget, every pixel moved by +-eta: the most change the budget
         allows, without structure. The control any cloak has to beat;
- none:  the photos unchanged, the no-defense baseline.

A method that needs a diffusion model asks the request for it (request.load_denoiser()); methods
that do not (noise, none, a trained defender network) never load one.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from .config import ConfigError, IDDMConfig

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from .iddm import ProgressEvent
    from .ports import Denoiser

# method -> "module:factory"; the factory takes a CloakRequest and returns a Cloak.
METHODS: dict[str, str] = {
    "aspl": "comfyui_iddm.aspl:aspl_cloak",
    "rid": "comfyui_iddm.rid:rid_cloak_method",
    "noise": "comfyui_iddm.cloak:noise_cloak",
    "none": "comfyui_iddm.cloak:no_cloak",
}
METHOD_HELP: dict[str, str] = {
    "aspl": "Anti-DreamBooth's ASPL: PGD that raises a surrogate model's denoising loss, the surrogate "
            "fine-tuned on the clean photos in turn (needs the base model)",
    "rid": "RID: a trained network cloaks each photo in one forward pass (--rid-weights FILE from "
           "`iddm rid-train` or the authors' release; no base model needed)",
    "noise": "random noise of the same budget (every pixel +-eta): the control a cloak must beat",
    "none": "the photos unchanged (the no-defense baseline)",
}

# Anti-DreamBooth's published ASPL settings (its scripts/attack_with_aspl.sh), in the shared knob
# names: 50 iterations of 3 fine-tune steps / 6 PGD steps / 3 fine-tune steps, eps 0.05 and step
# 0.005 in its [-1,1] pixel scale (0.025 and 0.0025 of the [0,1] range: 6.4 and 0.64 of 255). A
# LoRA needs a far larger learning rate than its full fine-tune's 5e-7 (as IDDM's default).
# rho 1 and no recognizers: no identity stage (ASPL's PGD is on the denoising loss alone); no face
# mask: ASPL perturbs the whole photo.
CLOAK_DEFAULTS: dict[str, Any] = dict(iterations=50, pgd_steps=6, ft_steps=3, eta=0.05, pgd_alpha=0.005,
                                      rho=1.0, recognizers=("none",), face_mask=False, lr=1e-4)
# The IDDMConfig knobs a cloak reads (flags of `iddm cloak`, keys of its report).
CLOAK_KNOBS = ("eta", "pgd_alpha", "pixel_range", "iterations", "pgd_steps", "ft_steps", "lr", "rank",
               "lora_alpha", "batch_size", "resolution", "seed", "instance_prompt", "class_prompt",
               "prior_weight", "mixed_precision", "gradient_checkpointing", "pgd_batch")

# The knobs each method reads (what its report lists): the others do not change its result.
METHOD_KNOBS: dict[str, tuple[str, ...]] = {
    "aspl": CLOAK_KNOBS,
    "rid": ("eta", "pixel_range", "resolution"),
    "noise": ("eta", "pixel_range", "resolution", "seed"),
    "none": ("resolution",),
}


def cloak_config(**overrides: Any) -> IDDMConfig:
    """The settings of a cloak: CLOAK_DEFAULTS, then the caller's."""
    unknown = sorted(set(overrides) - set(CLOAK_KNOBS))
    if unknown:
        raise ConfigError(f"{unknown} are not cloak settings; a cloak reads {', '.join(CLOAK_KNOBS)}.")
    return IDDMConfig(**{**CLOAK_DEFAULTS, **overrides})


@runtime_checkable
class Cloak(Protocol):
    method: str
    figures: dict[str, Any]  # numbers about the last protect() (method-specific; {} if none)

    def protect(self, photos: "Tensor") -> "Tensor":
        """photos [N,3,R,R] in [0,1] -> the cloaked photos: same shape, in [0,1], no pixel more
        than the budget (config.budget's eta) away from its original."""


@dataclass(frozen=True)
class CloakRequest:
    method: str
    config: IDDMConfig  # the budget (eta, pgd_alpha, pixel_range), seed and the method's schedule
    denoiser: Callable[[], "Denoiser"] | None = None  # the base model, loaded when a method asks
    class_images: "Tensor | None" = None  # prior preservation of a method that fine-tunes
    rid_weights: Path | None = None  # a trained defender network's weights file
    on_progress: Callable[["ProgressEvent"], None] | None = None
    should_cancel: Callable[[], bool] | None = None

    def load_denoiser(self) -> "Denoiser":
        if self.denoiser is None:
            raise ConfigError(f"method {self.method!r} needs the diffusion model it protects against; "
                              "give the base model (--base tiny, a diffusers folder or a checkpoint).")
        return self.denoiser()


def make_cloak(request: CloakRequest) -> Cloak:
    """The Cloak of request.method (METHODS)."""
    if request.method not in METHODS:
        raise ConfigError(f"cloak method {request.method!r} is unknown; choose one of {', '.join(METHODS)}.")
    module, factory = METHODS[request.method].split(":")
    return getattr(importlib.import_module(module), factory)(request)


@dataclass
class CloakOutcome:
    cloaked: "Tensor"  # [N,3,R,R] in [0,1], on the CPU
    seconds: float
    figures: dict[str, Any] = field(default_factory=dict)  # fidelity and the method's own figures

    @property
    def seconds_per_photo(self) -> float:
        return self.seconds / max(1, int(self.cloaked.shape[0]))


def run_cloak(cloak: Cloak, photos: "Tensor") -> CloakOutcome:
    """Cloaks the photos and measures what it cost: time, and the change against the originals."""
    import torch

    started = time.perf_counter()
    cloaked = cloak.protect(photos).detach().to("cpu", torch.float32)
    seconds = time.perf_counter() - started
    return CloakOutcome(cloaked, seconds, {**change_figures(cloaked, photos.cpu()), **cloak.figures})


def change_figures(cloaked: "Tensor", original: "Tensor") -> dict[str, float]:
    """L-inf (in [0,1] units), PSNR (dB; inf = unchanged) and SSIM of cloaked photos against the originals."""
    from .metrics import psnr, ssim

    return {"linf": round(float((cloaked - original).abs().max()), 5),
            "psnr": round(float(psnr(cloaked, original)), 3), "ssim": round(float(ssim(cloaked, original)), 4)}


# --- the two methods without a model ------------------------------------------------------------
@dataclass
class NoiseCloak:
    """Every pixel moved by +-eta with a random sign (seeded), then clipped to [0,1]."""
    eta: float  # [0,1] units
    seed: int
    method: str = "noise"
    figures: dict[str, Any] = field(default_factory=dict)

    def protect(self, photos: "Tensor") -> "Tensor":
        import torch

        from .pgd import project

        generator = torch.Generator().manual_seed(self.seed)
        signs = torch.randint(0, 2, photos.shape, generator=generator).to(photos.device, photos.dtype) * 2 - 1
        return project(photos + self.eta * signs, photos, self.eta)


@dataclass
class NoCloak:
    method: str = "none"
    figures: dict[str, Any] = field(default_factory=dict)

    def protect(self, photos: "Tensor") -> "Tensor":
        return photos.clone()


def noise_cloak(request: CloakRequest) -> NoiseCloak:
    return NoiseCloak(request.config.budget[0], request.config.seed)


def no_cloak(request: CloakRequest) -> NoCloak:
    return NoCloak()
