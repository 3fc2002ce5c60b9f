"""The paper's two losses, each in one place, built on the Denoiser port.

L_rec (eq. 8): the diffusion training loss, used by the fine-tune and by PGD Stage I.
L_id (eq. 13): 1 + S, where S (eq. 10-12, faces/ensemble.py) is the ensemble's similarity of the
one-step denoised prediction x0_hat to the person's identity; PGD Stage II minimises it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .ports import Denoiser, IdentityScorer


@dataclass(frozen=True)
class NoiseDraw:
    noise: Tensor
    t: Tensor


def draw_noise(denoiser: Denoiser, z0: Tensor, generator: torch.Generator,
               t_range: tuple[int, int] | None = None) -> NoiseDraw:
    """Timesteps and noise drawn on the CPU generator, so a seed gives the same run on any device."""
    lo, hi = t_range if t_range is not None else (0, denoiser.num_train_timesteps - 1)
    t = torch.randint(lo, hi + 1, (z0.shape[0],), generator=generator)
    noise = torch.randn(z0.shape, generator=generator, dtype=torch.float32)
    return NoiseDraw(noise.to(z0.device, z0.dtype), t.to(z0.device))


def reconstruction_loss(denoiser: Denoiser, z0: Tensor, cond: Tensor, draw: NoiseDraw) -> Tensor:
    """Eq. 8: E_t,eps || target - model(z_t, t, c) ||^2 (target = eps, or v for v-prediction models)."""
    z_t = denoiser.add_noise(z0, draw.noise, draw.t)
    with denoiser.autocast():
        output = denoiser.predict(z_t, draw.t, expand(cond, z0))
    target = denoiser.training_target(z0, draw.noise, draw.t)
    return F.mse_loss(output.float(), target.float())


def denoised_prediction(denoiser: Denoiser, z0: Tensor, cond: Tensor, draw: NoiseDraw) -> Tensor:
    """x0_hat = decode(predicted z0 from one denoising step of the frozen model at z_t), z0 = encode(x')."""
    z_t = denoiser.add_noise(z0, draw.noise, draw.t)
    with denoiser.autocast():
        output = denoiser.predict(z_t, draw.t, expand(cond, z0))
    return denoiser.decode(denoiser.predict_x0(z_t, draw.t, output.float()))


def identity_loss(scorer: IdentityScorer, x0_hat: Tensor, landmarks: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 13: L_id = 1 + S, averaged over the batch; also returns S per photo."""
    similarity = scorer.score(x0_hat, landmarks).total
    return 1.0 + similarity.mean(), similarity.detach()


def expand(cond: Tensor, like: Tensor) -> Tensor:
    """One prompt's conditioning repeated for every item of the batch."""
    return cond.expand(like.shape[0], *cond.shape[1:]) if cond.shape[0] == 1 else cond
