"""APDM (Lee, Seo, Ko, Park; NeurIPS 2025, arXiv 2511.01307): a model that will not learn one person.

A model provider changes its base model Θ so that a later DreamBooth personalization on the protected
person's photos fails, from clean photos too, while the model still denoises everything else as before
and can still be personalized on other people. Two parts, on the Denoiser port:

DPO (Direct Protective Optimization): Diffusion-DPO with the roles set for protection. The preferred
sample x+ is an image of someone else (a class image, e.g. generated from "a photo of person"), the
rejected sample x- a photo of the protected person; both under the instance prompt c, one noise and
timestep for the pair, against the frozen base model Θ_ref:

    e(Θ, x) = (target - Θ(z_t(x), t, c))^2                      per latent element
    m       = [e(Θ, x+) - e(Θ_ref, x+)] - [e(Θ, x-) - e(Θ_ref, x-)]
    L_DPO   = mean(-log sigmoid(-beta m))

It is bounded below and flattens once the person is denoised worse than Θ_ref denoises them (and others
better). The naive loss, -e(Θ, x-) (plain maximisation of the person's denoising loss), has no
minimum: it pushes the model on and on (the paper's convergence analysis). Both add the prior
preservation loss on class images (class prompt) to keep the model's other abilities.

L2P (Learning to Protect), the dual-path schedule:

    for i = 1..I:
        Θ' <- Θ                              a simulated attacker, with an optimizer of its own
        g  <- 0
        for j = 1..N:
            Θ' <- FT step(Θ'; X_person)       personalization path: one DreamBooth step (personalize.py)
            g  <- g + grad L_protect(Θ')      protection path, where the personalization has got to
        Θ  <- AdamW step(Θ; g)               first order: the gradient at Θ' moves Θ

The authors' settings (their protect.py / gen_arguments.py for persons) are the defaults below: I = 800,
N = 20, batch 1, AdamW lr 5e-6 in both paths, prior weight 1 in both paths, beta 1, every UNet weight
trained, the sum of the N gradients. Two readings of their code: the DPO term is averaged per latent
element, as there; and their sum also picks up each personalization step's own gradient (not cleared
before the protection backward), where g here is the protection gradient alone, the two paths apart.

What the protection changes (protect_weights): 'unet', the paper's choice, every UNet weight, written as
a UNet checkpoint (ComfyUI's Load Diffusion Model); or 'lora', a LoRA on the attention projections,
written in kohya format for the stock LoraLoader. The paper's choice is the default for a reason: an
attacker's LoRA trains exactly those attention projections, so a protection that lives there alone is
within its reach to undo; a change spread over every layer is not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import KNOBS, ConfigError, IDDMConfig, Knob, check_number
from .iddm import ProgressEvent, StepCounter, frozen
from .losses import NoiseDraw, draw_noise, mean_reconstruction_loss, reconstruction_loss
from .personalize import FineTuning, encode_in_chunks, random_batch
from .pgd import loss_scale_for
from .ports import Denoiser, UNetWeights
from .precision import MIXED_PRECISION
from .run_state import StateMismatchError, load_last_iteration, save_iteration

PROTECT_LOSSES = ("dpo", "naive")
PROTECT_WEIGHTS = ("unet", "lora")
PHASES = ("personalize", "protect")
METADATA_PREFIX = "apdm"

APDM_KNOBS: dict[str, Knob] = {
    "iterations": Knob("I, updates of the protected model; each follows one simulated personalization "
                       "(the authors: 800).", 1, 100000),
    "ft_steps": Knob("N, steps of each simulated personalization; the protection gradient is taken after "
                     "every one of them and summed (the authors: 20 for persons).", 1, 10000),
    "lr": Knob("Learning rate of both paths, AdamW (the authors: 5e-6 on every UNet weight; a LoRA needs "
               "a far larger rate, about 1e-4).", 0.0, 1.0, True),
    "dpo_beta": Knob("beta of the DPO loss: how sharply it flattens once the person is denoised worse "
                     "than the base model denoises them (the authors: 1).", 0.0, 1e4, True),
    "protect_loss": Knob("dpo (the paper's), or naive: plain maximisation of the person's denoising "
                         "loss, the baseline DPO improves on (no minimum: it degrades the model)."),
    "protect_weights": Knob("unet (the paper's): every UNet weight changes, saved as a UNet checkpoint "
                            "(Load Diffusion Model); lora: a LoRA on the attention projections (stock "
                            "LoraLoader), smaller but where an attacker's LoRA can undo it."),
    "prior_weight": Knob("Weight of the prior-preservation loss on class images, in both paths (the "
                         "authors: 1). 0 = off.", 0.0, 100.0),
    "batch_size": Knob("Photos per step of either path (the authors: 1).", 1, 256),
    **{name: KNOBS[name] for name in ("rank", "lora_alpha", "resolution", "seed", "instance_prompt",
                                      "class_prompt", "mixed_precision", "gradient_checkpointing")},
}
CHOICES = {"protect_loss": PROTECT_LOSSES, "protect_weights": PROTECT_WEIGHTS, "mixed_precision": MIXED_PRECISION}

# A LoRA protection with the authors' schedule (ComfyUI's node trains this form): a LoRA needs a far
# larger learning rate than their 5e-6 on every UNet weight (as IDDM's and the attacker's LoRAs do).
LORA_PROTECTION: dict[str, Any] = dict(protect_weights="lora", lr=1e-4)


@dataclass(frozen=True)
class APDMConfig:
    iterations: int = 800
    ft_steps: int = 20
    lr: float = 5e-6
    dpo_beta: float = 1.0
    protect_loss: str = "dpo"
    protect_weights: str = "unet"
    prior_weight: float = 1.0
    batch_size: int = 1
    rank: int = 4  # protect_weights lora only
    lora_alpha: float = 4.0
    resolution: int = 512
    seed: int = 0
    instance_prompt: str = "a photo of sks person"
    class_prompt: str = "a photo of person"
    mixed_precision: str = "no"  # the authors train in float32; every UNet weight needs it
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float"):
                check_number(f.name, value, APDM_KNOBS[f.name], integer=f.type == "int")
            elif f.name in CHOICES and value not in CHOICES[f.name]:
                raise ConfigError(f"{f.name}={value!r} is not one of {', '.join(CHOICES[f.name])}.")
        if self.resolution % 8:
            raise ConfigError(f"resolution={self.resolution} is not a multiple of 8; "
                              f"use e.g. {self.resolution // 8 * 8 or 64}.")
        for name in ("instance_prompt", "class_prompt"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} is empty; the default is {getattr(APDMConfig, name)!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fine_tune_config(self) -> IDDMConfig:
        """The shared knobs as the fine-tune loop and the model loaders read them."""
        return IDDMConfig(lr=self.lr, batch_size=self.batch_size, prior_weight=self.prior_weight, seed=self.seed,
                          instance_prompt=self.instance_prompt, class_prompt=self.class_prompt, rank=self.rank,
                          lora_alpha=self.lora_alpha, resolution=self.resolution, ft_steps=self.ft_steps,
                          mixed_precision=self.mixed_precision, gradient_checkpointing=self.gradient_checkpointing,
                          rho=1.0, pgd_steps=0, recognizers=("none",))

    def needs_class_images(self) -> bool:
        return self.protect_loss == "dpo" or self.prior_weight > 0


# --- what the protection changes ---------------------------------------------------------------
@dataclass
class ProtectedWeights:
    """The parameters APDM trains and the values they start from, which are Θ_ref: the base model
    (a LoRA starts at up = 0, the base model exactly)."""
    form: str
    names: list[str]  # UNet weight names (form unet); empty for a LoRA, exported in kohya format
    parameters: list[torch.nn.Parameter]
    reference: list[Tensor]

    @classmethod
    def of(cls, denoiser: Denoiser, form: str) -> "ProtectedWeights":
        if form == "lora":
            names, parameters = [], denoiser.trainable_parameters()
        else:
            if not isinstance(denoiser, UNetWeights):
                raise ConfigError("this model door trains only a LoRA; set protect_weights lora.")
            named = denoiser.unet_parameters()
            names, parameters = list(named), list(named.values())
            stored = sorted({str(p.dtype).replace("torch.", "") for p in parameters} - {"float32"})
            if stored:
                raise ConfigError(f"the UNet's weights are stored in {', '.join(stored)}; protect_weights unet "
                                  "trains them and needs float32: set mixed_precision no, or protect_weights lora.")
        return cls(form, names, parameters, [p.detach().clone() for p in parameters])

    @contextlib.contextmanager
    def trainable(self, denoiser: Denoiser) -> Iterator[None]:
        """Gradients for these parameters only, for the run (a UNet's LoRA stays at its fresh start)."""
        if self.form == "lora":
            yield
            return
        flags = [p.requires_grad for p in self.parameters]
        with frozen(denoiser.trainable_parameters()):
            for p in self.parameters:
                p.requires_grad_(True)
            try:
                yield
            finally:
                for p, flag in zip(self.parameters, flags):
                    p.requires_grad_(flag)

    @contextlib.contextmanager
    def as_reference(self) -> Iterator[None]:
        """The base model Θ_ref for the duration (no gradient), then the current values back."""
        current = [p.detach().clone() for p in self.parameters]
        _copy_into(self.parameters, self.reference)
        try:
            with torch.no_grad():
                yield
        finally:
            _copy_into(self.parameters, current)

    def export(self, denoiser: Denoiser) -> dict[str, Tensor]:
        """The protection as written: a kohya LoRA, or the UNet's weights by name, on the CPU."""
        if self.form == "lora":
            return denoiser.lora_state_dict()
        return {name: p.detach().to("cpu", torch.float32).clone() for name, p in zip(self.names, self.parameters)}

    def values(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def load(self, denoiser: Denoiser, state: dict[str, Tensor]) -> None:
        """Inverse of export (a resumed run)."""
        if self.form == "lora":
            denoiser.load_lora_state_dict(state)
        else:
            _copy_into(self.parameters, [state[name] for name in self.names])


@torch.no_grad()
def _copy_into(parameters: list[torch.nn.Parameter], values: list[Tensor]) -> None:
    for p, v in zip(parameters, values, strict=True):
        p.copy_(v)


# --- the two protection losses -----------------------------------------------------------------
def dpo_objective(error_positive: Tensor, reference_positive: Tensor, error_negative: Tensor,
                  reference_negative: Tensor, beta: float) -> Tensor:
    """L_DPO from per-element squared errors of the model and of Θ_ref on x+ (preferred: someone else)
    and x- (rejected: the protected person)."""
    margin = (error_positive - reference_positive) - (error_negative - reference_negative)
    return -F.logsigmoid(-beta * margin).mean()


def dpo_loss(denoiser: Denoiser, weights: ProtectedWeights, negative: Tensor, positive: Tensor, cond: Tensor,
             draw: NoiseDraw, beta: float) -> Tensor:
    """DPO on latents of the person (negative) and of someone else (positive), one draw for the pair."""
    with weights.as_reference():  # first: swapping weights after the graph is built would break backward
        references = [reconstruction_loss(denoiser, z0, cond, draw, "none") for z0 in (positive, negative)]
    errors = [reconstruction_loss(denoiser, z0, cond, draw, "none") for z0 in (positive, negative)]
    return dpo_objective(errors[0], references[0], errors[1], references[1], beta)


def naive_loss(denoiser: Denoiser, negative: Tensor, cond: Tensor, draw: NoiseDraw) -> Tensor:
    """The baseline: the person's denoising loss, maximised (minimising its negative)."""
    return -reconstruction_loss(denoiser, negative, cond, draw)


# --- L2P ------------------------------------------------------------------------------------------
@dataclass
class APDMRecord:
    personalize_loss: list[float] = field(default_factory=list)  # the simulated attacker's DreamBooth loss
    protect_loss: list[float] = field(default_factory=list)  # L_protect at each step (DPO or naive, + prior)
    seconds: float = 0.0


@dataclass
class APDMResult:
    weights: dict[str, Tensor]  # kohya LoRA (form lora) or the UNet's weights by name (form unet), CPU
    form: str
    iterations: list[APDMRecord]
    figures: dict[str, float]  # denoising losses of the base and the protected model (effect_figures)
    seconds_total: float


def total_steps(config: APDMConfig) -> int:
    return config.iterations * 2 * config.ft_steps


@dataclass
class ProtectionData:
    """Latents the run trains on: the person's photos, and images of others (DPO's preferred side and
    prior preservation), with the conditioning of both prompts."""
    subject: Tensor
    others: Tensor | None
    cond: Tensor  # instance prompt
    class_cond: Tensor


def run_apdm(denoiser: Denoiser, subject: Tensor, config: APDMConfig, *, class_images: Tensor | None = None,
             on_progress: Callable[[ProgressEvent], None] | None = None,
             should_cancel: Callable[[], bool] | None = None, state_dir: Path | None = None) -> APDMResult:
    """Protects the denoiser's model against learning the person in `subject` ([N,3,R,R] in [0,1]);
    class_images: images of other people (DPO's preferred side, prior preservation). The model is
    left protected (its LoRA, or its UNet weights, changed). With `state_dir`, every finished
    iteration is saved there and a run found there is continued (the same result as without a stop)."""
    if config.needs_class_images() and class_images is None:
        raise ConfigError("APDM needs class images (other people: DPO's preferred side"
                          + (", and prior preservation" if config.prior_weight > 0 else "")
                          + "); give them, or use protect_loss naive with prior_weight 0.")
    ft_config = config.fine_tune_config()
    weights = ProtectedWeights.of(denoiser, config.protect_weights)
    counter = StepCounter(total_steps(config), on_progress, should_cancel)
    history, started = [], time.perf_counter()
    with weights.trainable(denoiser):
        # The simulated attacker: the shared fine-tune loop, its AdamW on the protected weights.
        attacker = FineTuning.start(denoiser, ft_config, class_images, parameters=weights.parameters)
        optimizer = torch.optim.AdamW(weights.parameters, lr=config.lr, weight_decay=1e-2)
        data = _protection_data(denoiser, subject, class_images, attacker, config)
        check = _subject_check(denoiser, data, config.seed)
        first, seconds_before = 1, 0.0
        resumed = load_last_iteration(state_dir, config.to_dict()) if state_dir is not None else None
        if resumed is not None:
            if abs(resumed.meta["subject_check"] - check) > 1e-4 * abs(check):
                raise StateMismatchError(f"the saved run in {state_dir} protected other photos; resume with the "
                                         "same photos, or delete that folder to start over.")
            weights.load(denoiser, {k[8:]: v for k, v in resumed.tensors.items() if k.startswith("weights.")})
            optimizer.load_state_dict(resumed.optimizer)
            attacker.generator.set_state(resumed.tensors["generator_state"])
            history = [APDMRecord(**record) for record in resumed.meta["history"]]
            first, seconds_before = resumed.iteration + 1, resumed.meta["seconds"]
            counter.done = resumed.iteration * 2 * config.ft_steps
        for i in range(first, config.iterations + 1):
            history.append(_l2p_iteration(denoiser, weights, attacker, optimizer, data, config, counter, i))
            if state_dir is not None:
                tensors = {f"weights.{k}": v for k, v in weights.export(denoiser).items()}
                save_iteration(state_dir, i, {**tensors, "generator_state": attacker.generator.get_state()},
                               optimizer.state_dict(), {
                                   "config": config.to_dict(), "subject_check": check,
                                   "history": [dataclasses.asdict(r) for r in history],
                                   "seconds": seconds_before + time.perf_counter() - started})
    figures = effect_figures(denoiser, weights, data, config.seed)
    return APDMResult(weights.export(denoiser), weights.form, history, figures,
                      seconds_before + time.perf_counter() - started)


def _subject_check(denoiser: Denoiser, data: "ProtectionData", seed: int) -> float:
    """A figure of the base model on the person's photos: a saved run whose figure differs protected
    other photos (no fingerprint of the photos is ever stored)."""
    return mean_reconstruction_loss(denoiser, data.subject, data.cond, torch.Generator().manual_seed(seed), 2)


def _protection_data(denoiser: Denoiser, subject: Tensor, class_images: Tensor | None, attacker: FineTuning,
                     config: APDMConfig) -> ProtectionData:
    prior = attacker.prior  # class images already encoded when prior preservation is on
    others = prior.latents if prior is not None else (
        encode_in_chunks(denoiser, class_images, 1) if class_images is not None else None)
    with torch.no_grad():
        class_cond = prior.cond if prior is not None else denoiser.encode_prompt([config.class_prompt]).to(denoiser.device)
    return ProtectionData(encode_in_chunks(denoiser, subject, 1), others, attacker.cond, class_cond)


def _l2p_iteration(denoiser: Denoiser, weights: ProtectedWeights, attacker: FineTuning,
                   optimizer: torch.optim.Optimizer, data: ProtectionData, config: APDMConfig,
                   counter: StepCounter, i: int) -> APDMRecord:
    """One update of Θ: N personalization steps of a simulated attacker starting at Θ, the protection
    gradient after each, summed and applied to Θ."""
    record, started = APDMRecord(), time.perf_counter()
    protected = weights.values()  # Θ
    attacker.optimizer.state.clear()  # Θ' <- Θ, with an optimizer of its own from scratch
    summed = [torch.zeros_like(p) for p in weights.parameters]
    try:
        for j in range(1, config.ft_steps + 1):
            record.personalize_loss += attacker.run(data.subject, 1)
            counter.step(i, PHASES[0], j, config.ft_steps, record.personalize_loss[-1])
            loss, gradient = protection_gradient(denoiser, weights, data, config, attacker.generator)
            torch._foreach_add_(summed, gradient)
            record.protect_loss.append(loss)
            counter.step(i, PHASES[1], j, config.ft_steps, loss)
    finally:
        _copy_into(weights.parameters, protected)  # back to Θ (also when cancelled)
    for p, g in zip(weights.parameters, summed):
        p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    record.seconds = time.perf_counter() - started
    return record


def protection_gradient(denoiser: Denoiser, weights: ProtectedWeights, data: ProtectionData, config: APDMConfig,
                        generator: torch.Generator) -> tuple[float, list[Tensor]]:
    """L_protect (DPO or naive, plus prior preservation) at the current weights and its gradient."""
    others = data.others.shape[0] if data.others is not None else config.batch_size
    rows = min(config.batch_size, data.subject.shape[0], others)
    negative = data.subject[random_batch(data.subject.shape[0], rows, generator)]
    draw = draw_noise(denoiser, negative.shape, generator)
    if config.protect_loss == "dpo":
        positive = data.others[random_batch(others, rows, generator)]
        loss = dpo_loss(denoiser, weights, negative, positive, data.cond, draw, config.dpo_beta)
    else:
        loss = naive_loss(denoiser, negative, data.cond, draw)
    if config.prior_weight > 0:
        prior = data.others[random_batch(others, rows, generator)]
        loss = loss + config.prior_weight * reconstruction_loss(
            denoiser, prior, data.class_cond, draw_noise(denoiser, prior.shape, generator))
    scale = loss_scale_for(denoiser.compute_dtype)  # fp16: small gradients would flush to zero
    grads = torch.autograd.grad(loss * scale, weights.parameters, allow_unused=True)
    return float(loss.detach()), [torch.zeros_like(p) if g is None else g / scale
                                  for p, g in zip(weights.parameters, grads)]


EFFECT_DRAWS = 8  # noise draws (each with its own timestep) per image for effect_figures
EFFECT_IMAGES = 8  # images of others measured (class image sets can be large)


@torch.no_grad()
def effect_figures(denoiser: Denoiser, weights: ProtectedWeights, data: ProtectionData, seed: int) -> dict[str, float]:
    """Denoising loss of the base and the protected model, the same draws for both: on the person's
    photos (instance prompt; protection raises it) and on the images of others (class prompt; it
    should not change)."""
    sets = {"subject": (data.subject, data.cond)}
    if data.others is not None:
        sets["others"] = (data.others[:EFFECT_IMAGES], data.class_cond)
    figures = {}
    for name, (latents, cond) in sets.items():
        def loss() -> float:  # the same draws for both models
            return round(mean_reconstruction_loss(denoiser, latents, cond, torch.Generator().manual_seed(seed),
                                                  EFFECT_DRAWS), 5)
        figures[f"{name}_loss_protected"] = loss()
        with weights.as_reference():
            figures[f"{name}_loss_base"] = loss()
    return figures
