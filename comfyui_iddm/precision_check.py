"""Does training in half precision compute what float32 computes? One fine-tune step and one PGD step
of each stage, on the same weights, photos, LoRA and noise, compared between two denoisers (one in
float32, one in bf16 or fp16): losses, the cosine of the LoRA and photo gradients, NaN/inf, and the
share of photo gradients that are exactly zero (a pixel sign() does not move).

Used by the tests (tiny model, diffusers door), the real-ComfyUI tests (ComfyUI door under its
half-precision flags), benchmarks/gpu_check.sh and benchmarks/bench_real_size.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .iddm import frozen, stage1_loss, stage2_loss
from .losses import draw_noise, reconstruction_loss
from .personalize import encode_in_chunks
from .pgd import loss_scale_for, photo_gradient
from .ports import Denoiser, IdentityScorer
from .precision import needs_loss_scaling

# What "agree" means, stated once: bf16 keeps 8 bits of mantissa, so a deep network's loss moves by
# about a percent; directions (what sign() and the optimizer use) must stay nearly parallel.
LOSS_RELATIVE_TOLERANCE = 0.05
SCORE_ABSOLUTE_TOLERANCE = 0.02
MIN_COSINE = 0.99


@dataclass(frozen=True)
class StepFigures:
    dtype: str
    ft_loss: float
    lora_grad: Tensor  # every LoRA gradient, flattened, float32
    stage1_loss: float
    stage1_grad: Tensor  # d L_rec / d X'
    stage2_score: float  # S (ensemble similarity) of x0_hat
    stage2_grad: Tensor  # d L_id / d X'


def step_figures(denoiser: Denoiser, photos: Tensor, landmarks: Tensor, scorer: IdentityScorer, cond: Tensor,
                 *, seed: int = 0, stage2_timesteps: tuple[int, int] = (0, 200)) -> StepFigures:
    """One FT step's loss and LoRA gradient (no optimizer step), one Stage I and one Stage II photo
    gradient, with the loss scaling training would use for this denoiser's compute dtype."""
    photos, landmarks = photos.to(denoiser.device), landmarks.to(denoiser.device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = encode_in_chunks(denoiser, photos, photos.shape[0])
    params = denoiser.trainable_parameters()
    for p in params:
        p.grad = None
    ft_loss = reconstruction_loss(denoiser, latents, cond, draw_noise(denoiser, latents.shape, generator))
    scale = 2.0 ** 16 if needs_loss_scaling(denoiser.compute_dtype) else 1.0
    (ft_loss * scale).backward()
    lora_grad = torch.cat([(p.grad.float() / scale).flatten() for p in params if p.grad is not None])
    for p in params:
        p.grad = None
    loss_scale = loss_scale_for(denoiser.compute_dtype)
    with frozen(params):
        draw = draw_noise(denoiser, latents.shape, generator)
        stage1 = photo_gradient(stage1_loss(denoiser, cond, draw), photos, photos.shape[0], loss_scale)
        draw = draw_noise(denoiser, latents.shape, generator, stage2_timesteps)
        stage2 = photo_gradient(stage2_loss(denoiser, scorer, cond, draw, landmarks), photos, photos.shape[0],
                                loss_scale)
    return StepFigures(str(denoiser.compute_dtype).removeprefix("torch."), float(ft_loss.detach()),
                       lora_grad.cpu(), stage1.loss, stage1.grad.float().cpu(), stage2.loss - 1.0,
                       stage2.grad.float().cpu())


@dataclass(frozen=True)
class Agreement:
    dtype: str
    ft_loss_relative_diff: float
    stage1_loss_relative_diff: float
    stage2_score_diff: float
    lora_grad_cosine: float
    stage1_grad_cosine: float
    stage2_grad_cosine: float
    finite: bool  # no NaN/inf in any loss or gradient of the half-precision run
    zero_grad_fraction: dict  # {"stage1": .., "stage2": ..} of the half run, and of float32 for scale
    reference_zero_grad_fraction: dict

    @property
    def ok(self) -> bool:
        return (self.finite and max(self.ft_loss_relative_diff, self.stage1_loss_relative_diff) <= LOSS_RELATIVE_TOLERANCE
                and self.stage2_score_diff <= SCORE_ABSOLUTE_TOLERANCE
                and min(self.lora_grad_cosine, self.stage1_grad_cosine, self.stage2_grad_cosine) >= MIN_COSINE)

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok,
                "tolerances": {"loss_relative": LOSS_RELATIVE_TOLERANCE, "score_absolute": SCORE_ABSOLUTE_TOLERANCE,
                               "min_cosine": MIN_COSINE}}


def compare(reference: StepFigures, candidate: StepFigures) -> Agreement:
    """candidate (half precision) against reference (float32) on the same weights and draws."""
    tensors = (candidate.lora_grad, candidate.stage1_grad, candidate.stage2_grad)
    numbers = torch.tensor([candidate.ft_loss, candidate.stage1_loss, candidate.stage2_score])
    return Agreement(
        dtype=candidate.dtype,
        ft_loss_relative_diff=_relative(candidate.ft_loss, reference.ft_loss),
        stage1_loss_relative_diff=_relative(candidate.stage1_loss, reference.stage1_loss),
        stage2_score_diff=round(abs(candidate.stage2_score - reference.stage2_score), 6),
        lora_grad_cosine=_cosine(candidate.lora_grad, reference.lora_grad),
        stage1_grad_cosine=_cosine(candidate.stage1_grad, reference.stage1_grad),
        stage2_grad_cosine=_cosine(candidate.stage2_grad, reference.stage2_grad),
        finite=bool(torch.isfinite(numbers).all()) and all(bool(torch.isfinite(t).all()) for t in tensors),
        zero_grad_fraction=_zeros(candidate), reference_zero_grad_fraction=_zeros(reference))


def _relative(value: float, reference: float) -> float:
    return round(abs(value - reference) / max(abs(reference), 1e-12), 6)


def _cosine(a: Tensor, b: Tensor) -> float:
    return round(float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)), 6)


def _zeros(figures: StepFigures) -> dict:
    return {stage: round(float((grad == 0).double().mean()), 6)
            for stage, grad in (("stage1", figures.stage1_grad), ("stage2", figures.stage2_grad))}
