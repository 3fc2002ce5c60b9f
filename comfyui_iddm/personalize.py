"""FT(Θ; X): a short LoRA DreamBooth fine-tune on a set of photos' latents, with optional prior preservation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .losses import draw_noise, reconstruction_loss
from .ports import Denoiser


@dataclass
class PriorPreservation:
    latents: Tensor  # VAE latents of the class images
    cond: Tensor  # conditioning of the class prompt
    weight: float


def fine_tune(denoiser: Denoiser, optimizer: torch.optim.Optimizer, latents: Tensor, cond: Tensor,
              steps: int, batch_size: int, generator: torch.Generator,
              prior: PriorPreservation | None = None,
              scaler: torch.amp.GradScaler | None = None,
              after_step: Callable[[int, float], None] = lambda step, loss: None) -> list[float]:
    """`steps` optimizer steps on random batches of `latents`; returns the loss of each step."""
    losses = []
    for step in range(steps):
        batch = latents[random_batch(latents.shape[0], batch_size, generator)]
        loss = reconstruction_loss(denoiser, batch, cond, draw_noise(denoiser, batch.shape, generator))
        if prior is not None and prior.weight > 0:
            prior_batch = prior.latents[random_batch(prior.latents.shape[0], batch_size, generator)]
            loss = loss + prior.weight * reconstruction_loss(
                denoiser, prior_batch, prior.cond, draw_noise(denoiser, prior_batch.shape, generator))
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:  # fp16 autocast: scale the loss so small LoRA gradients do not underflow
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        losses.append(float(loss.detach()))
        after_step(step + 1, losses[-1])
    return losses


def random_batch(n: int, batch_size: int, generator: torch.Generator) -> Tensor:
    return torch.randperm(n, generator=generator)[:batch_size]
