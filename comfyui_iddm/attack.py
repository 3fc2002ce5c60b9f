"""The attacker every protection is measured against: plain DreamBooth-LoRA personalization on the
published photos, as someone misusing them would run it.

    Θ <- FT(Θ0; X_published)        one fine-tune of a fixed step budget (config.ft_steps), the
                                     instance prompt, optional prior preservation on class images

The same fine-tune loop as IDDM and ASPL (personalize.FineTuning), so the three differ only in the
photos: whatever a protection does, the attacker's effort is the same.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from .config import IDDMConfig
from .iddm import ProgressEvent, StepCounter
from .personalize import FineTuning, encode_in_chunks
from .ports import Denoiser

# The attacker's defaults in the shared knob names: a LoRA DreamBooth of a fixed budget.
ATTACK_DEFAULTS: dict[str, Any] = dict(ft_steps=400, lr=1e-4, batch_size=2, rho=1.0, pgd_steps=0,
                                       recognizers=("none",))
# The IDDMConfig knobs the attacker reads (flags of `iddm attack`).
ATTACK_KNOBS = ("ft_steps", "lr", "rank", "lora_alpha", "batch_size", "resolution", "seed", "instance_prompt",
                "class_prompt", "prior_weight", "mixed_precision", "gradient_checkpointing")
PHASE = "finetune_attack"


def attack_config(**overrides: Any) -> IDDMConfig:
    return IDDMConfig(**{**ATTACK_DEFAULTS, **overrides})


@dataclass
class AttackResult:
    lora: dict[str, Tensor]  # kohya format
    losses: list[float]  # the fine-tune loss of each step
    seconds: float


def attack_photos(denoiser: Denoiser, photos: Tensor, config: IDDMConfig, *,
                  class_images: Tensor | None = None,
                  on_progress: Callable[[ProgressEvent], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None) -> AttackResult:
    """DreamBooth-LoRA on `photos` ([N,3,R,R] in [0,1]) for config.ft_steps steps, from the
    denoiser's current LoRA (a fresh one: the base model)."""
    started = time.perf_counter()
    chunk = config.pgd_batch or photos.shape[0]
    training = FineTuning.start(denoiser, config, class_images, chunk)
    latents = encode_in_chunks(denoiser, photos, chunk)
    counter = StepCounter(config.ft_steps, on_progress, should_cancel)
    losses = training.run(latents, config.ft_steps, counter.reporter(1, PHASE, config.ft_steps))
    return AttackResult(denoiser.lora_state_dict(), losses, time.perf_counter() - started)
