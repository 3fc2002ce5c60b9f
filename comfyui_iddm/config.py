"""Every knob of IDDM's Algorithm 1, with the paper's defaults and validated ranges.

The field names are the shared vocabulary (DESIGN.md): CLI flag = `--` + name with `-`,
LoRA metadata key = `iddm.` + name, report `config` keys and node input names = name.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .precision import MIXED_PRECISION


class ConfigError(ValueError):
    """A knob has a value outside its allowed range; the message names knob, value and range."""


@dataclass(frozen=True)
class Knob:
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the value must be strictly greater than `low`


# What each knob trades; shown by the CLI's --help, the report and the node tooltips.
KNOBS: dict[str, Knob] = {
    "iterations": Knob("K, outer iterations of fine-tune / photo update / fine-tune. More: stronger "
                       "decoupling, proportionally longer run.", 1, 1000),
    "rho": Knob("Share of the PGD steps spent on Stage I (diffusion fidelity) before Stage II "
                "(identity push). Low: more privacy; high: more likeness. 0.1 privacy, 0.3 balanced, "
                "0.5 likeness.", 0.0, 1.0),
    "eta": Knob("Largest change of any pixel of a training photo (L-inf budget, pixels in [0,1]). "
                "Larger: stronger privacy, visibly noisier photos (paper Table 5: 0.08 gives PSNR ~33 dB).",
                0.0, 1.0),
    "tau": Knob("Softmax temperature over the recognizer ensemble. Small: attack the recognizer that "
                "still recognises the person most; large: average all recognizers.", 0.0, 100.0, True),
    "pgd_alpha": Knob("PGD step size on the photos per step (pixels in [0,1]).", 0.0, 1.0, True),
    "pgd_steps": Knob("T, PGD steps on the photos per iteration. 0 = no photo update (plain "
                      "alternating fine-tuning, the no-privacy baseline).", 0, 10000),
    "ft_steps": Knob("Optimizer steps in each fine-tune call (two calls per iteration).", 1, 100000),
    "lr": Knob("Learning rate of the LoRA fine-tune.", 0.0, 1.0, True),
    "rank": Knob("LoRA rank: capacity of the personalization.", 1, 1024),
    "lora_alpha": Knob("LoRA alpha (scale = lora_alpha / rank).", 0.0, 4096.0, True),
    "resolution": Knob("Side of the square face crops used for training, in pixels (multiple of 8).",
                       64, 2048),
    "batch_size": Knob("Photos per fine-tune step.", 1, 256),
    "seed": Knob("Seed for every random choice; the same seed gives the same LoRA on CPU.", 0, 2**63 - 1),
    "prior_weight": Knob("Weight of the prior-preservation loss on class images (0 = off).", 0.0, 100.0),
    "stage2_timesteps": Knob("Range [lo, hi] of diffusion timesteps Stage II denoises from. Small t: "
                             "the denoised prediction tracks the photo closely (paper silent; default "
                             "0-200 of 1000).", 0, 999),
    "instance_prompt": Knob("Prompt that names the person during personalization."),
    "class_prompt": Knob("Prompt of the class images for prior preservation."),
    "recognizers": Knob("Surrogate face recognizers Stage II pushes the identity away in. 'auto' = "
                        "the paper's ensemble (irse50, ir152, mobilefacenet, facenet) as far as their "
                        "weights are present, else dlib_resnet; never arcface (the paper's evaluator). "
                        "'auto,NAME' adds NAME to auto's choice; 'none' only without Stage II."),
    "mixed_precision": Knob("Compute dtype of the diffusion model: 'auto' (bf16 where the device has it, "
                            "fp16 with loss scaling on older GPUs, float32 on a CPU unless the weights "
                            "are stored in half precision), 'no' (float32), 'fp16' or 'bf16'. LoRA "
                            "weights and optimizer state are always float32."),
    "gradient_checkpointing": Knob("Recompute UNet and VAE activations in backward instead of keeping "
                                   "them: much less memory, about a third more time (on by itself on GPUs of 12 GB or less)."),
    "pixel_range": Knob("Pixel scale eta and pgd_alpha are given in: '-1,1' (the paper's, after "
                        "Anti-DreamBooth, whose code perturbs images normalised to [-1,1]: eta 0.08 is "
                        "0.04 of the [0,1] range, about 10 of 255) or '0,1' (twice the change)."),
    "face_mask": Knob("Limit the photo changes to the face region the recognizers look at (from the "
                      "landmarks, feathered): the background stays untouched. On by default: on real "
                      "photos it gave higher PSNR and more held-out privacy at every eta measured."),
    "target_similarity": Knob("Stop pushing a photo in Stage II once its ensemble similarity S is at or "
                              "below this (-1 = never stop): no more change than the target needs.", -1.0, 1.0),
    "step_decay": Knob("Shrink the PGD step over the iterations (cosine from pgd_alpha towards 0): "
                       "late iterations refine instead of adding full-size steps."),
    "pgd_batch": Knob("Photos per PGD forward/backward (0 = auto: from free memory on a GPU, all photos "
                      "on a CPU). Exact: the same X' as all at once, up to float rounding.", 0, 256),
}

# The factor from each pixel scale to [0,1] units: a change of 0.08 in [-1,1] is 0.04 in [0,1].
PIXEL_RANGES = {"-1,1": 0.5, "0,1": 1.0}
LEGACY_PIXEL_RANGE = "0,1"  # reports and LoRAs written before the scale was recorded
PAPER_PIXEL_RANGE = "-1,1"

PRESETS: dict[str, dict[str, Any]] = {
    "privacy": {"rho": 0.1},
    "balanced": {"rho": 0.3},
    "likeness": {"rho": 0.5},
}



@dataclass(frozen=True)
class IDDMConfig:
    iterations: int = 10
    rho: float = 0.3
    eta: float = 0.08
    tau: float = 0.03
    pgd_alpha: float = 0.008
    pgd_steps: int = 8
    ft_steps: int = 20
    # Paper: DreamBooth lr 5e-7 on the full UNet; a LoRA needs a far larger rate.
    lr: float = 1e-4
    rank: int = 4
    lora_alpha: float = 4.0
    resolution: int = 512
    batch_size: int = 2
    seed: int = 0
    instance_prompt: str = "a photo of sks person"
    class_prompt: str = "a photo of person"
    prior_weight: float = 0.0
    recognizers: tuple[str, ...] = ("auto",)
    stage2_timesteps: tuple[int, int] = (0, 200)
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    pgd_batch: int = 0
    pixel_range: str = PAPER_PIXEL_RANGE
    face_mask: bool = True
    target_similarity: float = -1.0
    step_decay: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.recognizers, str):
            object.__setattr__(self, "recognizers", parse_list(self.recognizers))
        else:
            object.__setattr__(self, "recognizers", tuple(self.recognizers))
        if isinstance(self.stage2_timesteps, str):
            object.__setattr__(self, "stage2_timesteps", parse_range(self.stage2_timesteps))
        else:
            object.__setattr__(self, "stage2_timesteps", tuple(self.stage2_timesteps))
        self.validate()

    @property
    def budget(self) -> tuple[float, float]:
        """(eta, pgd_alpha) in [0,1] pixel units, whatever pixel_range they are given in."""
        scale = PIXEL_RANGES[self.pixel_range]
        return self.eta * scale, self.pgd_alpha * scale

    @property
    def stage1_steps(self) -> int:
        """T_rec = floor(rho * T): the number of Stage I PGD steps per iteration."""
        return math.floor(self.rho * self.pgd_steps + 1e-9)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            knob = KNOBS[f.name]
            if f.type in ("int", "float"):
                check_number(f.name, value, knob, integer=f.type == "int")
        if self.resolution % 8:
            raise ConfigError(f"resolution={self.resolution} is not a multiple of 8; "
                              f"use e.g. {self.resolution // 8 * 8 or 64}.")
        ts = self.stage2_timesteps
        if len(ts) != 2 or not all(isinstance(t, int) for t in ts) or not 0 <= ts[0] <= ts[1] <= 999:
            raise ConfigError(f"stage2_timesteps={self.stage2_timesteps!r} is not a range lo,hi with "
                              "0 <= lo <= hi <= 999 (whole numbers).")
        if not self.recognizers or any(not r for r in self.recognizers):
            raise ConfigError("recognizers is empty; give 'auto' or a comma-separated list such as "
                              "'mobilefacenet,dlib_resnet'.")
        if "none" in self.recognizers and len(self.recognizers) > 1:
            raise ConfigError(f"recognizers={','.join(self.recognizers)!r} mixes 'none' with names; "
                              "give 'none' alone or a list of recognizers.")
        if self.recognizers == ("none",) and self.pgd_steps > self.stage1_steps:
            raise ConfigError(f"recognizers='none' leaves Stage II ({self.pgd_steps - self.stage1_steps} "
                              "step(s) per iteration) without a face recognizer; give 'auto' or names, "
                              "or set rho=1 or pgd_steps=0 (no identity push).")
        if self.pixel_range not in PIXEL_RANGES:
            raise ConfigError(f"pixel_range={self.pixel_range!r} is not one of {PIXEL_RANGES}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision={self.mixed_precision!r} is not one of {MIXED_PRECISION}.")
        if not self.instance_prompt.strip():
            raise ConfigError("instance_prompt is empty; the default is 'a photo of sks person'.")

    def replace(self, **changes: Any) -> "IDDMConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["recognizers"] = list(self.recognizers)
        d["stage2_timesteps"] = list(self.stage2_timesteps)
        return d

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "IDDMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(names)}.")
        # Settings saved before the pixel scale was recorded meant eta in [0,1] units.
        return cls(**{"pixel_range": LEGACY_PIXEL_RANGE, **values})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "IDDMConfig":
        if name not in PRESETS:
            raise ConfigError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


def check_number(name: str, value: Any, knob: Knob, integer: bool) -> None:
    """ConfigError (naming the setting, the value and the allowed range) unless `value` is a number
    (a whole one with `integer`) within the knob's range."""
    kind = "a whole number" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and math.isnan(value)):
        raise ConfigError(f"{name}={value!r} is not {kind}; {_range_text(knob)}.")
    too_low = knob.low is not None and (value <= knob.low if knob.low_open else value < knob.low)
    too_high = knob.high is not None and value > knob.high
    if too_low or too_high:
        raise ConfigError(f"{name}={value!r} is out of range; {_range_text(knob)}.")


def _range_text(knob: Knob) -> str:
    left = "(" if knob.low_open else "["
    return f"allowed range is {left}{knob.low:g}, {knob.high:g}]"


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_range(text: str) -> tuple[int, int]:
    parts = text.replace("-", ",").split(",")
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"stage2_timesteps={text!r} is not 'lo,hi' (e.g. '0,200').") from None
    return lo, hi
