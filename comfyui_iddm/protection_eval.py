"""How much of the person a DreamBooth-LoRA attacker learns from protected photos, measured the same
way for every protection: the one table of `iddm evaluate-protection`.

For each protection (a cloak method run here, or protected files given by the user) the attacker
(attack.py) fine-tunes the same base model with the same budget and seed on the protected photos.
Its model is then measured on HELD-OUT clean photos of the person (never published, never cloaked):

- denoise_loss: its diffusion training loss on them (the same noise and timesteps for every row);
  the better it learnt the person, the lower.
- x0_cosine: identity cosine, per face recognizer, of its one-step reconstruction x0_hat of them (at
  fixed timesteps) to the person (the prototype of the clean published photos); the better it learnt
  the person, the higher. The held-out photos' own landmarks align x0_hat, which stays in place.
- with `generations` > 0 (a real checkpoint), images from the papers' prompts scored with FSR and
  the identity cosine of their faces to the person (the ISM of Anti-DreamBooth and IDDM).

The first row is the base model before any attack (where the attacker starts); `none` is the attack
on unprotected photos. A protection works when its row sits nearer the base model than `none` does,
and it means something only when it does so more than `noise` of the same budget.

Model-side protections (a protected model, e.g. from `iddm immunize`; apdm.py) get rows of their own:
the same attacker, the same clean published photos, but starting from the protected model. Beside each,
what the protected model must still do (UtilitySets): denoise other people's photos and generic images
as the base model does, and learn a different person as well as the base model does. The attacker's
photos may pass through a PhotoTransform first (JPEG, resizing), for every row alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .apdm_weights import Protection, apply_protection
from .attack import attack_photos
from .cloak import Cloak, CloakRequest, change_figures, make_cloak, run_cloak
from .config import IDDMConfig
from .faces.ensemble import IdentityEnsemble
from .losses import NoiseDraw, denoised_prediction, mean_reconstruction_loss
from .photo_transforms import PhotoTransform
from .photos import PhotoSet
from .ports import Denoiser

# Anti-DreamBooth's and IDDM's evaluation prompts.
PAPER_PROMPTS = ("a photo of sks person", "a dslr portrait of sks person")
BASE_ROW = "no attack (base model)"
GIVEN_ROW = "given"
# Timesteps of the one-step reconstruction: small enough that x0_hat still shows a face, large enough
# that how well the model denoises this person decides what it shows (SD's schedule: alpha_bar 0.93
# at t 50, 0.55 at t 300).
PROBE_TIMESTEPS = (50, 100, 200, 300)
LOSS_DRAWS = 8  # noise draws (each with its own timestep) per held-out photo for denoise_loss
GENERIC_PROMPT = "a photo"  # what generic images are denoised under in the utility check


@dataclass(frozen=True)
class EvaluationSetup:
    attack: IDDMConfig  # the attacker's settings; ft_steps is its step budget
    cloak: IDDMConfig  # the budget and schedule of the cloak methods run here
    probe_timesteps: tuple[int, ...] = PROBE_TIMESTEPS
    loss_draws: int = LOSS_DRAWS
    generations: int = 0  # images per prompt (needs a real checkpoint to mean anything)
    prompts: tuple[str, ...] = PAPER_PROMPTS
    transform: PhotoTransform = PhotoTransform()  # what happens to the attacker's photos first


@dataclass
class ProtectionRow:
    method: str
    eta: float | None  # the budget in [0,1] units (None: no change, or unknown for given files)
    change: dict[str, float] = field(default_factory=dict)  # linf, psnr, ssim of the protected photos
    seconds_per_photo: float | None = None  # the protection's own time
    denoise_loss: float = 0.0
    x0_cosine: dict[str, float] = field(default_factory=dict)
    generation: dict[str, Any] | None = None  # {"fsr": .., "cosine": {recognizer: mean or None}}
    cloak_figures: dict[str, Any] = field(default_factory=dict)
    utility: dict[str, Any] = field(default_factory=dict)  # protected models: what they still do


@dataclass(frozen=True)
class ProtectedModel:
    label: str  # never the file's name (it may name the person)
    protection: Protection


@dataclass(frozen=True)
class UtilitySets:
    """What a protected model must still do, measured against the base model."""
    other_people: Tensor | None = None  # face crops of other people, denoised under the class prompt
    generic: Tensor | None = None  # generic images, denoised under GENERIC_PROMPT
    different_person: tuple[PhotoSet, PhotoSet] | None = None  # (published, held-out) of someone else


def evaluate_protection(denoiser: Denoiser, published: PhotoSet, held_out: PhotoSet, methods: Sequence[str],
                        recognizers: Sequence[torch.nn.Module], setup: EvaluationSetup, *,
                        given: Tensor | None = None, detector=None, class_images: Tensor | None = None,
                        rid_weights=None, protected_models: Sequence[ProtectedModel] = (),
                        utility: UtilitySets | None = None,
                        log: Callable[[str], None] = lambda message: None) -> list[ProtectionRow]:
    """One row per protection (the base model first). `denoiser` is the base model; every cloak and
    every attack starts from its LoRA as given (reset before each). `given`: protected versions of
    the published photos, in the same order. `protected_models`: attacked on the clean photos."""
    device = denoiser.device
    fresh = denoiser.lora_state_dict()
    # A protected model changes the UNet's own weights: keep the base model's to put them back.
    unet = {name: p.detach().clone() for name, p in denoiser.unet_parameters().items()} if protected_models else {}

    def base_model() -> Denoiser:
        _restore_unet(denoiser, unet)
        denoiser.load_lora_state_dict(fresh)
        return denoiser

    ensemble = IdentityEnsemble.from_reference(list(recognizers), published.images.to(device),
                                               published.landmarks.to(device), tau=1.0)

    def measured(row: ProtectionRow) -> ProtectionRow:
        row.denoise_loss, row.x0_cosine = measure_reconstruction(denoiser, held_out, ensemble, setup)
        if setup.generations:
            row.generation = measure_generations(denoiser, ensemble, detector, setup)
        return row

    # Every cloak is made before any work: a method's bad input (e.g. a missing weights file) stops
    # the evaluation at once, not after the rows before it.
    cloaks = [make_cloak(CloakRequest(method, setup.cloak, denoiser=base_model, class_images=class_images,
                                      rid_weights=rid_weights)) for method in methods]
    rows = [measured(ProtectionRow(BASE_ROW, None))]
    candidates: list[tuple[str, Callable[[], tuple[Tensor, ProtectionRow]]]] = []
    for cloak in cloaks:
        def cloaked(cloak: Cloak = cloak) -> tuple[Tensor, ProtectionRow]:
            outcome = run_cloak(cloak, published.images)
            eta = None if cloak.method == "none" else setup.cloak.budget[0]
            return outcome.cloaked, ProtectionRow(cloak.method, eta, _change(outcome.figures),
                                                  outcome.seconds_per_photo, cloak_figures=_own(outcome.figures))
        candidates.append((cloak.method, cloaked))
    if given is not None:
        candidates.append((GIVEN_ROW, lambda: (given, ProtectionRow(GIVEN_ROW, None,
                                                                   change_figures(given, published.images)))))
    for label, protect in candidates:
        log(f"{label}: protecting {len(published)} photo(s)")
        photos, row = protect()
        log(f"{label}: attacking ({setup.attack.ft_steps} fine-tune steps)")
        attack_photos(base_model(), setup.transform.apply(photos), setup.attack, class_images=class_images)
        rows.append(measured(row))
    baseline: dict[str, Any] = {}  # the base model's utility figures, measured once
    for model in protected_models:
        def protected_model(model: ProtectedModel = model) -> Denoiser:
            apply_protection(base_model(), model.protection)
            return denoiser
        row = ProtectionRow(model.label, None)
        loss, cosine = measure_reconstruction(protected_model(), held_out, ensemble, setup)
        row.utility["before_attack"] = {"denoise_loss": loss, "x0_cosine": cosine}
        if utility is not None:
            log(f"{model.label}: what it still does (utility checks)")
            row.utility.update(utility_figures(base_model, protected_model, utility, recognizers, setup,
                                               class_images, baseline))
        log(f"{model.label}: attacking the protected model on the clean photos ({setup.attack.ft_steps} steps)")
        attack_photos(protected_model(), setup.transform.apply(published.images), setup.attack,
                      class_images=class_images)
        rows.append(measured(row))
    base_model()  # leave the denoiser as it came
    return rows


def utility_figures(base_model: Callable[[], Denoiser], protected_model: Callable[[], Denoiser], sets: UtilitySets,
                    recognizers: Sequence[torch.nn.Module], setup: EvaluationSetup, class_images: Tensor | None,
                    baseline: dict[str, Any]) -> dict[str, Any]:
    """The protected model against the base model: denoising loss on other people's photos and on
    generic images (change: protected / base - 1), and the same attack on a different person from
    either (its held-out photos measured as the person's are). `baseline` keeps the base model's."""
    figures: dict[str, Any] = {}
    for name, images, prompt in (("other_people", sets.other_people, setup.attack.class_prompt),
                                 ("generic", sets.generic, GENERIC_PROMPT)):
        if images is not None:
            if name not in baseline:
                baseline[name] = denoising_loss(base_model(), images, prompt, setup)
            protected = denoising_loss(protected_model(), images, prompt, setup)
            figures[name] = {"base": baseline[name], "protected": protected,
                             "change": round(protected / baseline[name] - 1, 4)}
    if sets.different_person is not None:
        published, held_out = sets.different_person
        device = base_model().device
        ensemble = IdentityEnsemble.from_reference(list(recognizers), published.images.to(device),
                                                   published.landmarks.to(device), tau=1.0)

        def learnt(start: Callable[[], Denoiser]) -> dict[str, Any]:
            model = start()
            attack_photos(model, published.images, setup.attack, class_images=class_images)
            loss, cosine = measure_reconstruction(model, held_out, ensemble, setup)
            return {"denoise_loss": loss, "x0_cosine": cosine}
        if "different_person" not in baseline:
            baseline["different_person"] = learnt(base_model)
        protected = learnt(protected_model)
        base = baseline["different_person"]
        figures["different_person"] = {"base": base, "protected": protected,
                                       "change": round(protected["denoise_loss"] / base["denoise_loss"] - 1, 4)}
    return figures


@torch.no_grad()
def denoising_loss(denoiser: Denoiser, images: Tensor, prompt: str, setup: EvaluationSetup) -> float:
    """The denoiser's mean diffusion loss on `images` under `prompt` (draws seeded as for every row)."""
    cond = denoiser.encode_prompt([prompt]).to(denoiser.device)
    z0 = denoiser.encode(images.to(denoiser.device))
    return round(mean_reconstruction_loss(denoiser, z0, cond, torch.Generator().manual_seed(setup.attack.seed),
                                          setup.loss_draws), 5)


@torch.no_grad()
def _restore_unet(denoiser: Denoiser, saved: dict[str, Tensor]) -> None:
    if saved:
        for name, p in denoiser.unet_parameters().items():
            p.copy_(saved[name])


@torch.no_grad()
def measure_reconstruction(denoiser: Denoiser, held_out: PhotoSet, ensemble: IdentityEnsemble,
                           setup: EvaluationSetup) -> tuple[float, dict[str, float]]:
    """(denoise_loss, x0_cosine per recognizer) of the denoiser's current model on the held-out
    photos; the draws come from a generator seeded the same for every call."""
    device = denoiser.device
    generator = torch.Generator().manual_seed(setup.attack.seed)
    cond = denoiser.encode_prompt([setup.attack.instance_prompt]).to(device)
    images, landmarks = held_out.images.to(device), held_out.landmarks.to(device)
    z0 = denoiser.encode(images)
    loss = mean_reconstruction_loss(denoiser, z0, cond, generator, setup.loss_draws)
    cosines = []
    for t in setup.probe_timesteps:
        noise = torch.randn(tuple(z0.shape), generator=generator).to(device)
        draw = NoiseDraw(noise, torch.full((z0.shape[0],), t, dtype=torch.long, device=device))
        x0_hat = denoised_prediction(denoiser, z0, cond, draw).clamp(0, 1)
        cosines.append(ensemble.similarities(x0_hat, landmarks).mean(0))
    mean_cosine = torch.stack(cosines).mean(0)
    return (round(loss, 5),
            {name: round(float(v), 4) for name, v in zip(ensemble.names, mean_cosine)})


@torch.no_grad()
def measure_generations(denoiser: Denoiser, ensemble: IdentityEnsemble, detector,
                        setup: EvaluationSetup) -> dict[str, Any]:
    """FSR and mean identity cosine (per recognizer, over images with a face) of `generations`
    images per prompt, the same seeds for every row."""
    from .metrics import identity_similarity
    from .sampling import generate_images

    if detector is None:
        raise ValueError("scoring generations needs a face detector.")
    images = torch.cat([generate_images(denoiser, prompt, list(range(setup.generations)),
                                        setup.attack.resolution, setup.attack.seed)
                        for prompt in setup.prompts])
    report = identity_similarity(ensemble, list(images), detector.detect(images))
    return {"fsr": round(report.fsr, 4), "images": int(images.shape[0]),
            "cosine": {name: (round(v, 4) if v is not None else None) for name, v in report.mean.items()}}


# Below this rise of the x0_hat identity cosine (every recognizer) from the base model to the attack
# on unprotected photos, the attacker learnt no identity on this model: no protection can be ranked.
LEARNT_COSINE = 0.01


def attack_learnt(rows: Sequence[ProtectionRow]) -> dict[str, Any]:
    """What the attack on unprotected photos ('none') learnt over the base model: the drop of the
    denoising loss, the rise of each x0_hat cosine, and whether that is enough to rank protections."""
    base = next(r for r in rows if r.method == BASE_ROW)
    none = next(r for r in rows if r.method == "none")
    rise = {name: round(none.x0_cosine[name] - base.x0_cosine[name], 4) for name in base.x0_cosine}
    return {"denoise_loss_drop": round(base.denoise_loss - none.denoise_loss, 5), "x0_cosine_rise": rise,
            "identity_learnt": any(v >= LEARNT_COSINE for v in rise.values())}


def _change(figures: dict[str, Any]) -> dict[str, float]:
    return {key: figures[key] for key in ("linf", "psnr", "ssim")}


def _own(figures: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in figures.items() if key not in ("linf", "psnr", "ssim")}
