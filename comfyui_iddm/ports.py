"""The two ports the IDDM engine talks through: a diffusion model and a face-identity scorer.

Adapters implement them: backends/diffusers_backend.py (CLI, services, tests) and the ComfyUI
adapter in nodes/ (ComfyUI's own MODEL/VAE/CLIP). An adapter reports its noise schedule and
prediction type and makes the raw UNet call; the equations live in the engine (diffusion.py for the
DDPM arithmetic, losses.py, faces/ensemble.py), never inside an adapter.

Conventions: images are float tensors [B, 3, H, W] in [0, 1]; latents are whatever the model's
VAE produces, already multiplied by its scaling factor; timesteps are long tensors [B] in
[0, num_train_timesteps).
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from .diffusion import NoiseSchedule


@runtime_checkable
class Denoiser(Protocol):
    device: torch.device
    schedule: NoiseSchedule  # alpha_bar per training timestep and the prediction type
    compute_dtype: torch.dtype  # what the UNet computes in (float32, bfloat16 or float16; precision.py)

    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        """Text conditioning for the UNet, one row per prompt (no gradient)."""

    def encode(self, images: Tensor) -> Tensor:
        """Images in [0,1] -> scaled latents z0, float32 (differentiable w.r.t. images)."""

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [0,1], float32 (differentiable)."""

    def predict(self, z_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The raw UNet call: its output (epsilon or v, per schedule.prediction_type), float32."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA parameters the fine-tune updates (everything else stays frozen), float32."""

    def lora_state_dict(self) -> dict[str, Tensor]:
        """The LoRA in kohya format (lora_unet_*.lora_down/.lora_up/.alpha), on CPU."""

    def load_lora_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of lora_state_dict (used by resume); a state of another model is a LoRAError."""


@runtime_checkable
class UNetWeights(Protocol):
    """What a door offers when the model itself changes, not only a LoRA on it: APDM's full-UNet
    protection trains these weights, and the evaluation folds a protection LoRA into them before an
    attacker's fresh LoRA goes on top (the diffusers door has it)."""

    def unet_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The UNet's own weights (no LoRA) by their standard names, as stored."""

    def merge_lora(self) -> None:
        """Adds the current LoRA's change to the UNet's weights and puts the LoRA back to its fresh
        start (up = 0): the model stays the same, the next fine-tune starts a new LoRA on it."""


class IdentityScorer(Protocol):
    """Eq. 10-12 for a fixed identity: the softmax(s/tau)-weighted similarity S of faces to the
    identity prototypes of an ensemble of recognizers (faces/ensemble.py implements it)."""

    names: tuple[str, ...]

    def score(self, images: Tensor, landmarks: Tensor) -> "IdentityScore":
        """images [B,3,H,W] in [0,1] (differentiable); landmarks [B,5,2] in pixels of `images`."""


class IdentityScore(Protocol):
    total: Tensor  # [B] S = sum_m w_m s_m
    per_recognizer: Tensor  # [B, M] s_m
