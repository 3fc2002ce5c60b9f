"""Generating images with the model itself: a deterministic DDIM sampler on the Denoiser port.

Used to make DreamBooth's class images for prior preservation (as diffusers' DreamBooth example does
when the class folder holds too few), so it works for any adapter: diffusers, `tiny`, ComfyUI. The
step arithmetic is NoiseSchedule.ddim_step (diffusion.py); here only the loop and the guidance.
Each image has its own seed, so an image does not depend on how many are generated with it.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import Tensor

from .losses import expand
from .ports import Denoiser

DEFAULT_STEPS = 25  # DDIM steps; enough for SD's class images (diffusers' pipelines use 25-50)
DEFAULT_GUIDANCE = 7.5  # classifier-free guidance scale (diffusers' Stable Diffusion default)


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a run seeded `seed` (stable across Python versions and machines)."""
    digest = hashlib.sha256(f"iddm-sample:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps from the noisiest (T-1) down to 0, evenly spaced."""
    if steps < 1:
        raise ValueError(f"sampling needs at least one step, got {steps}.")
    grid = torch.linspace(num_train_timesteps - 1, 0, steps).round().long().tolist()
    return list(dict.fromkeys(grid))  # few train steps and many sample steps: no repeats


@torch.no_grad()
def sample_latents(denoiser: Denoiser, noise: Tensor, cond: Tensor, uncond: Tensor | None = None,
                   steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> Tensor:
    """DDIM (eta 0) from `noise` [B,C,h,w] to predicted clean latents. With `uncond` (the empty
    prompt's conditioning) and guidance != 1: classifier-free guidance, both branches in one call."""
    schedule = denoiser.schedule
    device = denoiser.device
    z = noise.to(device, torch.float32)
    timesteps = ddim_timesteps(schedule.num_train_timesteps, steps)
    guided = uncond is not None and guidance != 1.0
    batch = z.shape[0]
    conds = torch.cat([expand(uncond, z), expand(cond, z)]) if guided else expand(cond, z)
    for i, step in enumerate(timesteps):
        t = torch.full((batch,), step, dtype=torch.long, device=device)
        if guided:
            out_uncond, out_cond = denoiser.predict(torch.cat([z, z]), torch.cat([t, t]), conds).chunk(2)
            output = out_uncond + guidance * (out_cond - out_uncond)
        else:
            output = denoiser.predict(z, t, conds)
        t_prev = (torch.full_like(t, timesteps[i + 1]) if i + 1 < len(timesteps) else None)
        z = schedule.ddim_step(z, t, t_prev, output)
    return z


@torch.no_grad()
def generate_images(denoiser: Denoiser, prompt: str, indices: Sequence[int], resolution: int, seed: int, *,
                    steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                    batch_size: int = 4) -> Tensor:
    """Images [len(indices),3,R,R] in [0,1] for `prompt`; image i starts from the noise of
    image_seed(seed, i), so the same (seed, i) gives the same image whatever else is generated."""
    device = denoiser.device
    latent_shape = denoiser.encode(torch.zeros(1, 3, resolution, resolution, device=device)).shape[1:]
    cond = denoiser.encode_prompt([prompt]).to(device)
    uncond = denoiser.encode_prompt([""]).to(device) if guidance != 1.0 else None
    images = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        noise = torch.stack([torch.randn(tuple(latent_shape), dtype=torch.float32,
                                         generator=torch.Generator().manual_seed(image_seed(seed, i)))
                             for i in chunk])
        latents = sample_latents(denoiser, noise, cond, uncond, steps, guidance)
        images.append(denoiser.decode(latents).clamp(0, 1).cpu())
    return torch.cat(images) if images else torch.zeros(0, 3, resolution, resolution)
