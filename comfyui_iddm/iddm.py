"""Algorithm 1 of IDDM (arXiv 2604.00903), on any Denoiser and IdentityScorer.

    T_rec = floor(rho * T)
    for k = 1..K:
        Θ'k <- FT(Θk-1; Xc)                                    Step 1
        X'  <- X0
        for t = 1..T:                                          Step 2 (model frozen)
            loss = L_rec if t <= T_rec else L_id               Stage I, then Stage II
            X' <- Proj_{||X' - X_orig||inf <= eta, [0,1]}(X' - alpha * sign(grad loss))
        Θk  <- FT(Θ'k; X')                                     Step 3
        X0  <- X'
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from .config import IDDMConfig
from .faces.region import face_region
from .losses import NoiseDraw, denoised_prediction, draw_noise, identity_loss, reconstruction_loss
from .memory import PhotoChunks
from .personalize import FineTuning, encode_in_chunks
from .pgd import loss_scale_for, photo_gradient, signed_step
from .ports import Denoiser, IdentityScorer
from .run_state import RunState, load_latest_state, save_state


class Cancelled(Exception):
    """The user cancelled; nothing was written (a resumable state of finished iterations may remain)."""


PHASES = ("finetune_reference", "stage1", "stage2", "finetune_decoupled")


@dataclass(frozen=True)
class ProgressEvent:
    iteration: int  # k, from 1
    phase: str  # one of PHASES
    step: int  # within the phase, from 1
    steps: int  # steps of the phase
    value: float  # FT / Stage I: L_rec; Stage II: S (the ensemble similarity, lower = more private)
    done: int  # steps finished in the whole run
    total: int


@dataclass
class IterationRecord:
    stage1_loss: list[float] = field(default_factory=list)  # L_rec at each Stage I step
    stage2_score: list[float] = field(default_factory=list)  # S at each Stage II step
    pgd_zero_grad: list[float] = field(default_factory=list)  # share of photo gradients exactly 0, per PGD step
    ft_loss: list[float] = field(default_factory=list)  # both fine-tunes, in order
    seconds: float = 0.0


@dataclass
class IDDMResult:
    lora: dict[str, Tensor]  # kohya format
    decoupled: Tensor  # X', [N,3,H,W] in [0,1]
    iterations: list[IterationRecord]
    seconds_total: float


def total_steps(config: IDDMConfig) -> int:
    return config.iterations * (2 * config.ft_steps + config.pgd_steps)


def run_iddm(denoiser: Denoiser, reference: Tensor, protection: Tensor, protection_landmarks: Tensor,
             scorer: IdentityScorer | None, config: IDDMConfig, *,
             class_images: Tensor | None = None,
             on_progress: Callable[[ProgressEvent], None] | None = None,
             should_cancel: Callable[[], bool] | None = None,
             state_dir: Path | None = None) -> IDDMResult:
    """Runs Algorithm 1. With `state_dir`, saves a resumable state after each iteration and resumes
    from the last one found there (same result as an uninterrupted run with the same seed)."""
    if scorer is None and config.pgd_steps > config.stage1_steps:
        raise ValueError("Stage II needs face recognizers (an IdentityScorer); none was given.")
    device = denoiser.device
    x_orig = protection.to(device)
    landmarks = protection_landmarks.to(device)
    step_counter = StepCounter(total_steps(config), on_progress, should_cancel)
    chunks = PhotoChunks(config.pgd_batch, x_orig.shape[0], device)
    training = FineTuning.start(denoiser, config, class_images, chunks.size)
    optimizer, generator, cond = training.optimizer, training.generator, training.cond
    reference_latents = encode_in_chunks(denoiser, reference, chunks.size)  # Xc never changes
    latent_shape = (x_orig.shape[0], *reference_latents.shape[1:])

    x_prime, history, first_k, seconds_before = x_orig.clone(), [], 1, 0.0
    resumed = load_latest_state(state_dir, config, x_orig.cpu()) if state_dir is not None else None
    if resumed is not None:
        denoiser.load_lora_state_dict(resumed.lora)
        optimizer.load_state_dict(resumed.optimizer)
        generator.set_state(resumed.generator_state)
        x_prime = resumed.decoupled.to(device)
        history = [IterationRecord(**record) for record in resumed.history]
        first_k, seconds_before = resumed.iteration + 1, resumed.seconds
        step_counter.done = resumed.iteration * (2 * config.ft_steps + config.pgd_steps)

    started = time.perf_counter()
    for k in range(first_k, config.iterations + 1):
        record, k_started = IterationRecord(), time.perf_counter()

        # Step 1: Θ'k <- FT(Θk-1; Xc)
        record.ft_loss += training.run(reference_latents, config.ft_steps,
                                       step_counter.reporter(k, "finetune_reference", config.ft_steps))

        # Step 2: Stage I then Stage II on the protection photos, model frozen
        x_prime = decouple_photos(denoiser, scorer, x_prime, x_orig, landmarks, cond, config,
                                  generator, record, step_counter, k, chunks, latent_shape)

        # Step 3: Θk <- FT(Θ'k; X')
        decoupled_latents = encode_in_chunks(denoiser, x_prime, chunks.size)
        record.ft_loss += training.run(decoupled_latents, config.ft_steps,
                                       step_counter.reporter(k, "finetune_decoupled", config.ft_steps))
        record.seconds = time.perf_counter() - k_started
        history.append(record)
        if state_dir is not None:
            save_state(state_dir, config, RunState(
                iteration=k, lora=denoiser.lora_state_dict(), optimizer=optimizer.state_dict(),
                generator_state=generator.get_state(), decoupled=x_prime.detach().cpu(),
                history=[asdict(r) for r in history],
                seconds=seconds_before + time.perf_counter() - started))

    return IDDMResult(denoiser.lora_state_dict(), x_prime.detach().cpu(), history,
                      seconds_before + time.perf_counter() - started)


def decouple_photos(denoiser: Denoiser, scorer: IdentityScorer | None, x_prime: Tensor, x_orig: Tensor,
                    landmarks: Tensor, cond: Tensor, config: IDDMConfig, generator: torch.Generator,
                    record: IterationRecord, step_counter: "StepCounter", k: int, chunks: PhotoChunks,
                    latent_shape: tuple[int, ...]) -> Tensor:
    """Step 2: T signed PGD steps; the first T_rec on L_rec (Stage I), the rest on L_id (Stage II).
    The noise of a step is drawn for all photos at once, so chunking (pgd_batch) changes nothing."""
    stage1_steps = config.stage1_steps
    stage2_steps = config.pgd_steps - stage1_steps
    loss_scale = loss_scale_for(denoiser.compute_dtype)
    eta, alpha = photo_budget(config, landmarks, x_orig.shape[-2:], k)
    with frozen(denoiser.trainable_parameters()):
        for t in range(1, config.pgd_steps + 1):
            stage1 = t <= stage1_steps
            draw = draw_noise(denoiser, latent_shape, generator, None if stage1 else config.stage2_timesteps)
            chunk_loss = (stage1_loss(denoiser, cond, draw) if stage1 else
                          stage2_loss(denoiser, scorer, cond, draw, landmarks))
            gradient = chunks.run(lambda size: photo_gradient(chunk_loss, x_prime, size, loss_scale))
            record.pgd_zero_grad.append(gradient.zero_fraction)
            grad = gradient.grad
            if stage1:
                record.stage1_loss.append(gradient.loss)
                step_counter.step(k, "stage1", t, stage1_steps, gradient.loss)
            else:
                record.stage2_score.append(gradient.loss - 1.0)  # L_id = 1 + S
                step_counter.step(k, "stage2", t - stage1_steps, stage2_steps, record.stage2_score[-1])
                reached = gradient.per_photo <= config.target_similarity  # photos private enough: leave them
                grad = grad * (~reached).to(grad.dtype).view(-1, 1, 1, 1)
            # One memory layout for X' always: the step's output inherits the gradient's layout, and a
            # resumed run (X' read from disk) must compute bit-identically to an uninterrupted one.
            x_prime = signed_step(x_prime, grad, x_orig, alpha, eta).contiguous()
    return x_prime


def photo_budget(config: IDDMConfig, landmarks: Tensor, size: tuple[int, int],
                 k: int) -> tuple[float | Tensor, float | Tensor]:
    """eta and alpha of iteration k in [0,1] pixel units: per pixel (0 off the face) with face_mask,
    alpha shrinking over the iterations (cosine) with step_decay."""
    eta, alpha = config.budget
    if config.step_decay:
        alpha *= 0.5 * (1 + math.cos(math.pi * (k - 1) / config.iterations))
    if not config.face_mask:
        return eta, alpha
    region = face_region(landmarks, *size)
    return eta * region, alpha * region


def stage1_loss(denoiser: Denoiser, cond: Tensor, draw: NoiseDraw):
    """Stage I's L_rec (eq. 8) for a chunk of the photos: its share of the batch mean, and each
    photo's own L_rec."""
    total = draw.noise.numel()

    def loss(x: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        errors = reconstruction_loss(denoiser, denoiser.encode(x), cond, draw[rows], "none")
        return errors.sum() / total, errors.detach().flatten(1).mean(1)
    return loss


def stage2_loss(denoiser: Denoiser, scorer: IdentityScorer, cond: Tensor, draw: NoiseDraw, landmarks: Tensor):
    """Stage II's L_id (eq. 13) on x0_hat for a chunk of the photos: its share of the batch mean, and
    each photo's S."""
    photos = draw.t.shape[0]

    def loss(x: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        x0_hat = denoised_prediction(denoiser, denoiser.encode(x), cond, draw[rows])
        return identity_loss(scorer, x0_hat, landmarks[rows], batch_size=photos)
    return loss


@contextlib.contextmanager
def frozen(parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    """The model is frozen during the photo update: no parameter gradients are built or kept."""
    flags = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(parameters, flags):
            p.requires_grad_(flag)


class StepCounter:
    """Counts steps across the run, reports progress and polls for cancellation between steps."""

    def __init__(self, total: int, on_progress, should_cancel) -> None:
        self.total, self.done = total, 0
        self.on_progress, self.should_cancel = on_progress, should_cancel

    def step(self, k: int, phase: str, step: int, steps: int, value: float) -> None:
        self.done += 1
        if self.on_progress is not None:
            self.on_progress(ProgressEvent(k, phase, step, steps, value, self.done, self.total))
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled(f"cancelled at iteration {k}, {phase} step {step}/{steps}")

    def reporter(self, k: int, phase: str, steps: int) -> Callable[[int, float], None]:
        return lambda step, value: self.step(k, phase, step, steps, value)
