"""FT(Θ; X): a short LoRA DreamBooth fine-tune on a set of photos' latents, with optional prior
preservation, and what every fine-tune call of one run shares (FineTuning: one optimizer, one
generator, the prompt's conditioning). IDDM, ASPL and the attacker all personalize through here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from .losses import draw_noise, reconstruction_loss
from .ports import Denoiser
from .precision import needs_loss_scaling

if TYPE_CHECKING:
    from .config import IDDMConfig


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


@dataclass
class FineTuning:
    """One run's fine-tune state: a single optimizer over the LoRA (never re-created between calls),
    the run's generator (every random draw, PGD's included, comes from it: a seed gives one run),
    the instance prompt's conditioning and the prior-preservation batch source."""
    denoiser: Denoiser
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    generator: torch.Generator
    cond: Tensor
    prior: PriorPreservation | None
    batch_size: int

    @classmethod
    def start(cls, denoiser: Denoiser, config: "IDDMConfig", class_images: Tensor | None = None,
              chunk: int = 1, parameters: list[torch.nn.Parameter] | None = None) -> "FineTuning":
        """A fresh run: seeded generator, AdamW on the LoRA (or on `parameters`), fp16 loss scaling when
        the model needs it; the class images (if any) encoded once, `chunk` at a time."""
        generator = torch.Generator().manual_seed(config.seed)
        trained = denoiser.trainable_parameters() if parameters is None else parameters
        optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=1e-2)
        device = denoiser.device
        scaler = torch.amp.GradScaler(device.type) if needs_loss_scaling(denoiser.compute_dtype) else None
        with torch.no_grad():
            cond = denoiser.encode_prompt([config.instance_prompt]).to(device)
            prior = None
            if class_images is not None and config.prior_weight > 0:
                prior = PriorPreservation(encode_in_chunks(denoiser, class_images, chunk),
                                          denoiser.encode_prompt([config.class_prompt]).to(device),
                                          config.prior_weight)
        return cls(denoiser, optimizer, scaler, generator, cond, prior, config.batch_size)

    def run(self, latents: Tensor, steps: int,
            after_step: Callable[[int, float], None] = lambda step, loss: None) -> list[float]:
        """FT(Θ; X) for `steps` optimizer steps on these latents; the loss of each step."""
        return fine_tune(self.denoiser, self.optimizer, latents, self.cond, steps, self.batch_size,
                         self.generator, self.prior, self.scaler, after_step)


@torch.no_grad()
def encode_in_chunks(denoiser: Denoiser, images: Tensor, chunk: int) -> Tensor:
    """VAE latents of images, `chunk` at a time (no gradient): the VAE at 512 px is memory-hungry."""
    return torch.cat([denoiser.encode(images[i:i + chunk].to(denoiser.device))
                      for i in range(0, images.shape[0], chunk)])
