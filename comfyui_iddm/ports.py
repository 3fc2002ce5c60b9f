"""The two ports the IDDM engine talks through: a diffusion model and a face-identity scorer.

Adapters implement them: backends/diffusers_backend.py (CLI, services, tests) and the ComfyUI
adapter in nodes/ (ComfyUI's own MODEL/VAE/CLIP). The equations of the paper live in the engine
(losses.py, faces/ensemble.py), built on these primitives, never inside an adapter.

Conventions: images are float tensors [B, 3, H, W] in [0, 1]; latents are whatever the model's
VAE produces, already multiplied by its scaling factor; timesteps are long tensors [B] in
[0, num_train_timesteps).
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    device: torch.device
    num_train_timesteps: int
    prediction_type: str  # "epsilon" or "v_prediction"

    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        """Text conditioning for the UNet, one row per prompt (no gradient)."""

    def encode(self, images: Tensor) -> Tensor:
        """Images in [0,1] -> scaled latents z0 (differentiable w.r.t. images)."""

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [0,1] (differentiable)."""

    def add_noise(self, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward diffusion q(z_t | z0)."""

    def predict(self, z_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The UNet's raw output (epsilon or v, per prediction_type)."""

    def training_target(self, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What `predict` is trained to output: noise for epsilon models, v for v-prediction."""

    def predict_x0(self, z_t: Tensor, t: Tensor, model_output: Tensor) -> Tensor:
        """The one-step denoised latent implied by the model output at (z_t, t)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA parameters the fine-tune updates (everything else stays frozen)."""

    def lora_state_dict(self) -> dict[str, Tensor]:
        """The LoRA in kohya format (lora_unet_*.lora_down/.lora_up/.alpha), on CPU."""

    def load_lora_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of lora_state_dict (used by resume)."""

    def autocast(self):
        """Context manager for the configured mixed precision (a no-op on CPU / 'no')."""


class IdentityScorer(Protocol):
    """Eq. 10-12 for a fixed identity: the softmax(s/tau)-weighted similarity S of faces to the
    identity prototypes of an ensemble of recognizers (faces/ensemble.py implements it)."""

    names: tuple[str, ...]

    def score(self, images: Tensor, landmarks: Tensor) -> "IdentityScore":
        """images [B,3,H,W] in [0,1] (differentiable); landmarks [B,5,2] in pixels of `images`."""


class IdentityScore(Protocol):
    total: Tensor  # [B] S = sum_m w_m s_m
    per_recognizer: Tensor  # [B, M] s_m
