"""The DDPM arithmetic, in one place: forward noising, the training target and the one-step x0
prediction, for epsilon and v-prediction models.

An adapter only reports its model's noise schedule (alpha_bar per training timestep) and prediction
type; every equation on them lives here (diffusers' DDPM convention: z_t = sqrt(a) z0 + sqrt(1-a) eps,
integer t in [0, T)). Computed in float32 whatever the model's dtype: alpha_bar near 1 (small t)
loses its meaning in half precision.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: Tensor  # [T] alpha_bar_t, float32, on the model's device
    prediction_type: str  # one of PREDICTION_TYPES

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"the model predicts {self.prediction_type!r}; IDDM supports {PREDICTION_TYPES}.")

    @classmethod
    def from_sigmas(cls, sigmas: Tensor, prediction_type: str) -> "NoiseSchedule":
        """From a k-diffusion sigma table (ComfyUI's model_sampling): sigma^2 = (1 - a) / a."""
        sigmas = sigmas.detach().float()
        return cls(1.0 / (1.0 + sigmas ** 2), prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast over `like`."""
        alpha_bar = self.alphas_cumprod[t.to(self.alphas_cumprod.device)].to(like.device)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return alpha_bar.sqrt().view(shape), (1 - alpha_bar).sqrt().view(shape)

    def add_noise(self, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward diffusion q(z_t | z0)."""
        a, s = self.coefficients(t, z0)
        return a * z0.float() + s * noise.float()

    def training_target(self, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model is trained to output: the noise (epsilon) or v = sqrt(a) eps - sqrt(1-a) z0."""
        if self.prediction_type == "epsilon":
            return noise.float()
        a, s = self.coefficients(t, z0)
        return a * noise.float() - s * z0.float()

    def predict_x0(self, z_t: Tensor, t: Tensor, model_output: Tensor) -> Tensor:
        """The one-step denoised latent implied by the model output at (z_t, t)."""
        a, s = self.coefficients(t, z_t)
        z_t, model_output = z_t.float(), model_output.float()
        if self.prediction_type == "epsilon":
            return (z_t - s * model_output) / a
        return a * z_t - s * model_output

    def predict_noise(self, z_t: Tensor, t: Tensor, model_output: Tensor) -> Tensor:
        """The noise implied by the model output at (z_t, t): eps itself, or sqrt(a) v + sqrt(1-a) z_t."""
        if self.prediction_type == "epsilon":
            return model_output.float()
        a, s = self.coefficients(t, z_t)
        return a * model_output.float() + s * z_t.float()

    def ddim_step(self, z_t: Tensor, t: Tensor, t_prev: Tensor | None, model_output: Tensor) -> Tensor:
        """One deterministic DDIM step (eta 0) from t to t_prev < t: the predicted z0 re-noised with the
        noise the model output implies. t_prev None = the last step: the predicted z0 itself."""
        z0 = self.predict_x0(z_t, t, model_output)
        if t_prev is None:
            return z0
        a, s = self.coefficients(t, z_t)
        noise = (z_t.float() - a * z0) / s
        a_prev, s_prev = self.coefficients(t_prev, z_t)
        return a_prev * z0 + s_prev * noise

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        return NoiseSchedule(self.alphas_cumprod.to(device, torch.float32), self.prediction_type)
