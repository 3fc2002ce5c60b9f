"""ASPL, Anti-DreamBooth's cloak (Van Le et al., ICCV 2023, arXiv 2303.15433), on any Denoiser.

    f <- the base model with a fresh LoRA
    X' <- X_orig
    for k = 1..K:
        f' <- FT(a copy of f; X_clean)                      Step 1: a surrogate learns the person
        for t = 1..T:                                       Step 2: PGD on the photos, f' frozen
            X' <- Proj_{||X' - X_orig||inf <= eta, [0,1]}( X' + alpha * sign(grad_X' L_rec(f'; X')) )
        f  <- FT(f; X')                                     Step 3: f learns the cloaked photos
    return X'

L_rec is the diffusion training loss of IDDM's Stage I (iddm.stage1_loss, eq. 8 there); ASPL *raises*
it: the step has the opposite sign. X_clean are clean photos of the person (Anti-DreamBooth's set A;
a user cloaking the photos they post has those photos themselves). Pixels and budget follow the
shared convention (config.budget: eta and alpha in the pixel_range they are given in, applied in
[0,1] units).

Where this does less work than Anti-DreamBooth's attacks/aspl.py for the same steps: "a copy of f"
is a snapshot of f's LoRA and optimizer state, put back after Step 2 (its code deep-copies the UNet
and text encoder three times per iteration); one optimizer for the whole run (its code makes a new
one per fine-tune call); no parameter gradients during PGD (iddm.frozen; its code computes the whole
model's); photo latents encoded once per fine-tune call, not once per step. The surrogate is a LoRA
on the frozen base model, as in Anti-DreamBooth's aspl_lora.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .cloak import CloakRequest
from .config import IDDMConfig
from .iddm import ProgressEvent, StepCounter, frozen, stage1_loss
from .losses import draw_noise
from .memory import PhotoChunks
from .personalize import FineTuning, encode_in_chunks
from .pgd import loss_scale_for, photo_gradient, signed_step
from .ports import Denoiser

PHASES = ("finetune_surrogate", "pgd", "finetune_cloaked")


@dataclass
class ASPLRecord:
    surrogate_ft_loss: list[float] = field(default_factory=list)  # Step 1
    pgd_loss: list[float] = field(default_factory=list)  # the surrogate's L_rec on X' at each PGD step (goes up)
    ft_loss: list[float] = field(default_factory=list)  # Step 3
    seconds: float = 0.0


@dataclass
class ASPLResult:
    cloaked: Tensor  # X', [N,3,H,W] in [0,1], on the CPU
    iterations: list[ASPLRecord]
    seconds_total: float


def total_steps(config: IDDMConfig) -> int:
    return config.iterations * (2 * config.ft_steps + config.pgd_steps)


def run_aspl(denoiser: Denoiser, clean: Tensor, targets: Tensor, config: IDDMConfig, *,
             class_images: Tensor | None = None,
             on_progress: Callable[[ProgressEvent], None] | None = None,
             should_cancel: Callable[[], bool] | None = None) -> ASPLResult:
    """Cloaks `targets` ([N,3,R,R] in [0,1]); the surrogate learns the person from `clean` (which may
    be the targets themselves)."""
    device = denoiser.device
    x_orig = targets.to(device)
    chunks = PhotoChunks(config.pgd_batch, x_orig.shape[0], device)
    training = FineTuning.start(denoiser, config, class_images, chunks.size)
    clean_latents = encode_in_chunks(denoiser, clean, chunks.size)
    latent_shape = (x_orig.shape[0], *clean_latents.shape[1:])
    counter = StepCounter(total_steps(config), on_progress, should_cancel)
    parameters = denoiser.trainable_parameters()

    x_adv, history, started = x_orig.clone(), [], time.perf_counter()
    for k in range(1, config.iterations + 1):
        record, k_started = ASPLRecord(), time.perf_counter()
        f = TrainingSnapshot.take(parameters, training.optimizer)

        # Step 1: f' <- FT(copy of f; X_clean)
        record.surrogate_ft_loss = training.run(clean_latents, config.ft_steps,
                                                counter.reporter(k, PHASES[0], config.ft_steps))
        # Step 2: PGD that raises f''s denoising loss on X'
        x_adv = raise_denoising_loss(denoiser, training, x_adv, x_orig, config, chunks, latent_shape,
                                     record, counter.reporter(k, PHASES[1], config.pgd_steps))
        # Step 3: f <- FT(f; X')
        f.restore(parameters, training.optimizer)
        record.ft_loss = training.run(encode_in_chunks(denoiser, x_adv, chunks.size), config.ft_steps,
                                      counter.reporter(k, PHASES[2], config.ft_steps))
        record.seconds = time.perf_counter() - k_started
        history.append(record)
    return ASPLResult(x_adv.detach().cpu(), history, time.perf_counter() - started)


def raise_denoising_loss(denoiser: Denoiser, training: FineTuning, x_adv: Tensor, x_orig: Tensor,
                         config: IDDMConfig, chunks: PhotoChunks, latent_shape: tuple[int, ...],
                         record: ASPLRecord, after_step: Callable[[int, float], None]) -> Tensor:
    """Step 2: T signed gradient-ascent steps on L_rec, the model frozen (no parameter gradients);
    each step's noise and timesteps are drawn for all photos at once, so chunking changes nothing."""
    eta, alpha = config.budget
    loss_scale = loss_scale_for(denoiser.compute_dtype)
    with frozen(denoiser.trainable_parameters()):
        for step in range(1, config.pgd_steps + 1):
            draw = draw_noise(denoiser, latent_shape, training.generator)
            chunk_loss = stage1_loss(denoiser, training.cond, draw)
            gradient = chunks.run(lambda size: photo_gradient(chunk_loss, x_adv, size, loss_scale))
            record.pgd_loss.append(gradient.loss)
            x_adv = signed_step(x_adv, -gradient.grad, x_orig, alpha, eta)  # ascent: -grad
            after_step(step, gradient.loss)
    return x_adv


@dataclass
class TrainingSnapshot:
    """f's LoRA weights and optimizer state: the surrogate f' starts as a copy of f, and f is put
    back after the surrogate's turn. A LoRA is a few MB: copying it costs nothing next to a step."""
    weights: list[Tensor]
    optimizer_state: dict

    @classmethod
    def take(cls, parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> "TrainingSnapshot":
        state = {p: {key: value.clone() if isinstance(value, Tensor) else value for key, value in s.items()}
                 for p, s in optimizer.state.items()}
        return cls([p.detach().clone() for p in parameters], state)

    @torch.no_grad()
    def restore(self, parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        for p, saved in zip(parameters, self.weights, strict=True):
            p.copy_(saved)
        optimizer.state.clear()
        optimizer.state.update(self.optimizer_state)


class ASPLCloak:
    """cloak.Cloak for ASPL: the surrogate learns the person from the photos being cloaked."""

    method = "aspl"

    def __init__(self, request: CloakRequest) -> None:
        self.request = request
        self.figures: dict[str, Any] = {}

    def protect(self, photos: Tensor) -> Tensor:
        """Runs ASPL from the model's LoRA as it is, and puts that LoRA back afterwards: protecting
        several batches with one cloak gives each the same start."""
        request = self.request
        denoiser = request.load_denoiser()
        before = denoiser.lora_state_dict()
        try:
            result = run_aspl(denoiser, photos, photos, request.config, class_images=request.class_images,
                              on_progress=request.on_progress, should_cancel=request.should_cancel)
        finally:
            denoiser.load_lora_state_dict(before)
        first, last = result.iterations[0], result.iterations[-1]
        # The surrogate's denoising loss on X' at the first and the last PGD step: ASPL raises it.
        self.figures = ({"surrogate_loss_first": round(first.pgd_loss[0], 5),
                         "surrogate_loss_last": round(last.pgd_loss[-1], 5)} if first.pgd_loss else {})
        return result.cloaked


def aspl_cloak(request: CloakRequest) -> ASPLCloak:
    return ASPLCloak(request)
