"""The paper's two losses, each in one place, built on the Denoiser port.

L_rec (eq. 8): the diffusion training loss, used by the fine-tune and by PGD Stage I.
L_id (eq. 13): 1 + S, where S (eq. 10-12, faces/ensemble.py) is the ensemble's similarity of the
one-step denoised prediction x0_hat to the person's identity; PGD Stage II minimises it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .ports import Denoiser, IdentityScorer


@dataclass(frozen=True)
class NoiseDraw:
    noise: Tensor
    t: Tensor

    def __getitem__(self, rows: slice) -> "NoiseDraw":
        """The draws of some photos: a chunk of the batch gets exactly its own noise and timestep."""
        return NoiseDraw(self.noise[rows], self.t[rows])


def draw_noise(denoiser: Denoiser, shape: Sequence[int], generator: torch.Generator,
               t_range: tuple[int, int] | None = None) -> NoiseDraw:
    """A timestep per item and noise of `shape` (the latents' [B, C, h, w]), drawn on the CPU
    generator so a seed gives the same run on any device."""
    lo, hi = t_range if t_range is not None else (0, denoiser.schedule.num_train_timesteps - 1)
    t = torch.randint(lo, hi + 1, (shape[0],), generator=generator)
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return NoiseDraw(noise.to(denoiser.device), t.to(denoiser.device))


def reconstruction_loss(denoiser: Denoiser, z0: Tensor, cond: Tensor, draw: NoiseDraw,
                        reduction: str = "mean") -> Tensor:
    """Eq. 8: E_t,eps || target - model(z_t, t, c) ||^2 (target = eps, or v for v-prediction models).
    reduction "sum" gives the sum of squared errors (PGD chunks add up to the whole batch's loss)."""
    schedule = denoiser.schedule
    z_t = schedule.add_noise(z0, draw.noise, draw.t)
    output = denoiser.predict(z_t, draw.t, expand(cond, z0))
    return F.mse_loss(output, schedule.training_target(z0, draw.noise, draw.t), reduction=reduction)


@torch.no_grad()
def mean_reconstruction_loss(denoiser: Denoiser, z0: Tensor, cond: Tensor, generator: torch.Generator,
                             draws: int) -> float:
    """Eq. 8 averaged over `draws` noise draws (each with its own timesteps) from `generator`: a
    measurement, comparable between models when the generator starts from the same seed."""
    return sum(float(reconstruction_loss(denoiser, z0, cond, draw_noise(denoiser, z0.shape, generator)))
               for _ in range(draws)) / draws


def denoised_prediction(denoiser: Denoiser, z0: Tensor, cond: Tensor, draw: NoiseDraw) -> Tensor:
    """x0_hat = decode(predicted z0 from one denoising step of the frozen model at z_t), z0 = encode(x')."""
    schedule = denoiser.schedule
    z_t = schedule.add_noise(z0, draw.noise, draw.t)
    output = denoiser.predict(z_t, draw.t, expand(cond, z0))
    return denoiser.decode(schedule.predict_x0(z_t, draw.t, output))


def identity_loss(scorer: IdentityScorer, x0_hat: Tensor, landmarks: Tensor,
                  batch_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Eq. 13: L_id = 1 + S, averaged over a batch of `batch_size` photos (default: these); for a
    chunk of a larger batch, its share of that average. Also returns S per photo."""
    similarity = scorer.score(x0_hat, landmarks).total
    return (1.0 + similarity).sum() / (batch_size or similarity.shape[0]), similarity.detach()


def expand(cond: Tensor, like: Tensor) -> Tensor:
    """One prompt's conditioning repeated for every item of the batch."""
    return cond.expand(like.shape[0], *cond.shape[1:]) if cond.shape[0] == 1 else cond
