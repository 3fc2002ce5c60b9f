"""The built-in `tiny` model: SD-shaped, random UNet, built in code from a seed (no files).

For demos and tests on CPU. Only the UNet and the text conditioning are random; the "VAE" is an
exactly invertible pixel_unshuffle by 8 (8x smaller spatially like SD's VAE, 3*64 = 192 latent
channels), so decode(predicted z0) tracks the photo at small t and Stage II's identity signal
reaches the photos (DESIGN.md, "Runs without a pretrained diffusion model must still mean something").
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from torch.nn import functional as F

DOWNSCALE = 8
LATENT_CHANNELS = 3 * DOWNSCALE * DOWNSCALE
CROSS_ATTENTION_DIM = 32
PROMPT_LENGTH = 16
VOCAB_BUCKETS = 4096


class PixelUnshuffleCodec(nn.Module):
    """images [B,3,H,W] in [0,1] <-> latents [B,192,H/8,W/8]; decode(encode(x)) == x exactly.

    decode does not clamp: a clamp would zero the gradient of every out-of-range pixel and break
    the exact inverse that keeps x0_hat tracking x'.
    """

    scaling_factor = 1.0
    downscale = DOWNSCALE

    def encode(self, images: Tensor) -> Tensor:
        return F.pixel_unshuffle(images * 2 - 1, DOWNSCALE)

    def decode(self, latents: Tensor) -> Tensor:
        return (F.pixel_shuffle(latents, DOWNSCALE) + 1) / 2


class HashedPromptEncoder(nn.Module):
    """Deterministic text conditioning without a tokenizer: each word picks a row of a seeded random
    table by a stable hash, plus a position embedding; padded to a fixed length. Different prompts
    give different conditioning, the same prompt always the same."""

    def __init__(self, dim: int = CROSS_ATTENTION_DIM, length: int = PROMPT_LENGTH,
                 buckets: int = VOCAB_BUCKETS) -> None:
        super().__init__()
        self.length, self.buckets = length, buckets
        # Rows 0 and 1 are start and padding, like CLIP's BOS / EOS-padding.
        self.register_buffer("table", torch.randn(buckets + 2, dim))
        self.register_buffer("position", torch.randn(length, dim) * 0.1)

    def token_ids(self, prompt: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", prompt.lower())
        ids = [0] + [2 + int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little") % self.buckets
                     for w in words]
        ids = ids[: self.length]
        return ids + [1] * (self.length - len(ids))

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Tensor:
        ids = torch.tensor([self.token_ids(p) for p in prompts], device=self.table.device)
        return self.table[ids] + self.position


@dataclass
class TinyParts:
    unet: UNet2DConditionModel
    codec: PixelUnshuffleCodec
    prompt_encoder: HashedPromptEncoder
    scheduler: DDPMScheduler


def tiny_unet() -> UNet2DConditionModel:
    """SD's blocks at toy width: cross-attention down/mid/up blocks whose attention modules are named
    like SD's (attn1/attn2 with to_q/to_k/to_v/to_out.0), so kohya keys look like SD's.

    Attention sits at half the latent resolution (SD: also at full): self-attention is quadratic in
    tokens, and at full resolution a 512 px step took 6x longer on CPU."""
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=2,  # diffusers' legacy name: the number of heads (2 x 32 channels)
        cross_attention_dim=CROSS_ATTENTION_DIM,
    )


def tiny_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """SD's training noise schedule (scaled_linear 0.00085..0.012, 1000 steps)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type=prediction_type)


def build_tiny(prediction_type: str = "epsilon", model_seed: int = 0) -> TinyParts:
    """The same weights for the same model_seed (the "pretrained" tiny base), independent of the
    caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_seed)
        unet = tiny_unet()
        prompt_encoder = HashedPromptEncoder()
    return TinyParts(unet, PixelUnshuffleCodec(), prompt_encoder, tiny_scheduler(prediction_type))


def pretrain(denoiser, images: Tensor, steps: int, *, lr: float = 1e-3, prompt: str = "a photo of person",
             batch_size: int = 4, seed: int = 0) -> list[float]:
    """Trains every UNet weight of a tiny denoiser (diffusers door) on `images` with the engine's
    fine-tune loop: a tiny base that denoises faces, for what needs a model with something to lose
    (a protected model must keep denoising everyone else; a random UNet has nothing to keep).
    Returns the loss of each step."""
    from ..config import IDDMConfig
    from ..iddm import frozen
    from ..personalize import FineTuning, encode_in_chunks

    weights = list(denoiser.unet_parameters().values())
    config = IDDMConfig(lr=lr, batch_size=batch_size, seed=seed, instance_prompt=prompt, resolution=images.shape[-1],
                        mixed_precision="no", rho=1.0, pgd_steps=0, recognizers=("none",))
    for p in weights:
        p.requires_grad_(True)
    try:
        with frozen(denoiser.trainable_parameters()):  # the LoRA stays at its fresh start
            training = FineTuning.start(denoiser, config, parameters=weights)
            return training.run(encode_in_chunks(denoiser, images, batch_size), steps)
    finally:
        for p in weights:
            p.requires_grad_(False)
