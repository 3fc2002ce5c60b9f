"""`iddm demo`: the whole job on an embedded default, offline, on a CPU, in a few minutes.

The "private set" is made from ONE real face in a sample photo that ships inside an installed
package (insightface's t1.jpg): crops, flips, colour changes and small rotations of it give a few
photos of the same person, split into reference (Xc) and protection (X0) photos. The diffusion
model is the built-in `tiny` one (random UNet, exactly invertible pixel codec, so Stage II's
identity signal reaches the photos); faces are found with MTCNN; dlib's ResNet (real weights from
PyPI) is the surrogate Stage II attacks; every other recognizer whose weights are present (e.g. a
MobileFaceNet in the weights folder) is a held-out evaluator, only measured.

What it proves: the pipeline end to end and the identity decoupling of the training photos under
real face recognizers. What it cannot: portrait quality and likeness of generations, which need a
real Stable Diffusion checkpoint (and, for reasonable speed, a GPU).
"""
from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import atomic
from .config import IDDMConfig

if TYPE_CHECKING:  # torch, numpy and PIL load inside the functions: `iddm --help` stays fast
    import torch
    from PIL import Image

    from .photos import PhotoSet

# Measured on 2 CPU cores (benchmarks/README.md). Stage II denoises from t in 0..20: the tiny
# model's UNet is random, so only at small t does x0_hat stay close enough to X' for the
# recognizer's gradient to carry identity (0..200 halved the surrogate's drop in our runs).
# eta 0.02 ([-1,1] scale, at most 2.5/255): the sample crops are small, upscaled and smooth-skinned,
# and the tiny model's pixel-space "VAE" leaves the change as per-pixel noise; at 0.03 and above
# that noise shows on the cheeks at normal viewing size (checked on the report's strip).
DEMO_CONFIG = dict(iterations=6, pgd_steps=10, rho=0.3, eta=0.02, pgd_alpha=0.008, ft_steps=8,
                   resolution=256, batch_size=2, rank=4, lora_alpha=4.0, lr=1e-4, tau=0.03,
                   stage2_timesteps=(0, 20), recognizers=("dlib_resnet",), seed=0)
DEMO_PHOTOS = 8  # augmented photos of the one sample face
DEMO_REFERENCE = 4  # of them in Xc; the rest are protected (the paper uses 4 + 4)
SAMPLE_PACKAGE, SAMPLE_FILE = "insightface", ("data", "images", "t1.jpg")
REGION_SCALE = 2.6  # the sample region around the face, in face-box sides (room for rotation/crops)
LORA_NAME = "iddm_demo_lora.safetensors"


def demo_config(**overrides: Any) -> IDDMConfig:
    return IDDMConfig(**{**DEMO_CONFIG, **overrides})


def sample_photo_path() -> Path:
    """insightface's t1.jpg (six faces of different people), located without importing insightface
    (its import pulls in heavy optional dependencies)."""
    spec = importlib.util.find_spec(SAMPLE_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder).joinpath(*SAMPLE_FILE)
        if path.is_file():
            return path
    raise FileNotFoundError("the demo's sample photo ships in the insightface package, which is not "
                            "installed; install it without its dependencies: pip install --no-deps insightface")


def frontal_face(detections) -> Any:
    """The most frontal of the sample photo's faces (nose closest to the middle of the eyes),
    so the augmented set starts from a face every recognizer sees well."""
    import numpy as np

    from .photos import PhotoError

    def asymmetry(face) -> float:
        eyes_mid = (face.landmarks[0] + face.landmarks[1]) / 2
        eye_distance = np.linalg.norm(face.landmarks[1] - face.landmarks[0])
        return abs(face.landmarks[2][0] - eyes_mid[0]) / max(eye_distance, 1e-6)
    big = [f for f in detections if f.size >= 60]
    if not big:
        raise PhotoError("no usable face in the demo's sample photo; is the insightface package intact?")
    return min(big, key=asymmetry)


def augmented_photos(image: Image.Image, box, count: int, seed: int) -> list[Image.Image]:
    """`count` variations of the region around one face: scale/shift crops, mirror images, small
    rotations, brightness/contrast/colour changes. Deterministic for a seed."""
    import numpy as np
    from PIL import Image, ImageEnhance, ImageOps

    rng = np.random.default_rng(seed)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = max(box[2] - box[0], box[3] - box[1]) * REGION_SCALE
    photos = []
    for i in range(count):
        s = side * rng.uniform(0.9, 1.1)
        dx, dy = rng.uniform(-0.06, 0.06, size=2) * side
        region = image.crop((int(cx + dx - s / 2), int(cy + dy - s / 2), int(cx + dx + s / 2),
                             int(cy + dy + s / 2)))
        region = region.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BICUBIC,
                               fillcolor=(128, 128, 128))
        if i % 2:
            region = ImageOps.mirror(region)
        for enhancer, spread in ((ImageEnhance.Brightness, 0.15), (ImageEnhance.Contrast, 0.15),
                                 (ImageEnhance.Color, 0.25)):
            region = enhancer(region).enhance(float(rng.uniform(1 - spread, 1 + spread)))
        photos.append(region)
    return photos


def sample_private_set(resolution: int, detector, count: int = DEMO_PHOTOS, seed: int = 0) -> PhotoSet:
    """The demo's private set: `count` face-centred crops of one sample face, with landmarks."""
    import torch
    from PIL import Image

    from .photos import PhotoError, photoset_from_images, pil_to_tensor, read_image

    image = read_image(sample_photo_path())
    face = frontal_face(detector.detect(pil_to_tensor(image)[None])[0])
    variations = augmented_photos(image, face.box, count, seed)
    images = torch.stack([pil_to_tensor(v.resize((256, 256), Image.Resampling.LANCZOS)) for v in variations])
    photos = photoset_from_images(images, resolution, detector, names=[f"sample {i}" for i in range(count)])
    lost = [issue.reason for issue in photos.issues if issue.skipped]
    if len(photos) < 2:
        raise PhotoError(f"the face detector kept {len(photos)} of the {count} demo photos ({lost}).")
    return photos


@dataclass
class DemoResult:
    out_dir: Path
    report_html: Path
    report: dict[str, Any]
    seconds: float


def run_demo(out_dir: Path, config: IDDMConfig | None = None, *, weights_dir: Path | None = None,
             photos: int = DEMO_PHOTOS, reference: int = DEMO_REFERENCE,
             on_progress: Callable | None = None, log: Callable[[str], None] = print) -> DemoResult:
    """Runs IDDM on the sample private set and writes into `out_dir`: the LoRA, X' PNGs,
    report.json, report.html and its PNG plots. Nothing is downloaded. A previous demo's files of
    the same names are replaced (they hold only sample data); nothing else in the folder is touched."""
    from .backends.diffusers_backend import load_denoiser
    from .cli import print_summary
    from .faces.detect import MTCNNDetector
    from .lora_io import save_lora
    from .photos import split_photos
    from .pipeline import choose_recognizers, save_decoupled, train_on_photos
    from .report import headline, write_report_html

    started = time.perf_counter()
    config = config or demo_config()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_path, report_path = out_dir / LORA_NAME, out_dir / "report.json"

    log(f"[demo] building the private set: {photos} variations of one face from a sample photo")
    detector = MTCNNDetector()
    private = sample_private_set(config.resolution, detector, photos, config.seed)
    xc, x0 = split_photos(private, min(reference, len(private) - 1), "order")
    roles = choose_recognizers(config, weights_dir)  # the run's own rule, for the log
    surrogates, held_out = roles.surrogates, list(roles.held_out)
    log(f"[demo] {len(xc)} reference + {len(x0)} protected photos at {config.resolution} px; "
        f"surrogate: {', '.join(surrogates)}; held-out: {', '.join(held_out) or 'none available'}")
    denoiser = load_denoiser("tiny", config)
    result = train_on_photos(denoiser, xc, x0, config, weights_dir=weights_dir, evaluators=held_out,
                             on_progress=on_progress)

    report = dict(result.report)
    report["notes"] = demo_notes(held_out)
    add_shuffled_control(report, xc, x0, result.decoupled, weights_dir, config)
    save_decoupled(result.decoupled, out_dir)
    atomic.write_text(report_path, json.dumps(report, indent=2))
    save_lora(lora_path, result.lora, result.metadata, overwrite=True)
    html_path = write_report_html(report, out_dir, strip=(x0.images, result.decoupled))
    seconds = time.perf_counter() - started
    print_summary(report, lora_path)
    for line in headline(report):
        log(f"[demo] {line}")
    log(f"[demo] finished in {seconds:.0f} s; open the report: {html_path}")
    return DemoResult(out_dir, html_path, report, seconds)


def add_shuffled_control(report: dict[str, Any], reference: PhotoSet, protection: PhotoSet,
                         decoupled: torch.Tensor, weights_dir: Path | None, config: IDDMConfig) -> None:
    """Adds to each identity row `control`: the similarity of X0 plus the SAME change X' - X0 with its
    values shuffled across positions (same L-inf, same PSNR up to clipping, no structure). Without
    it a held-out drop could be mere noise sensitivity; IDDM's drop should be well below it."""
    import torch

    from .faces.ensemble import IdentityEnsemble
    from .faces.registry import load_recognizers

    rows = report.get("identity", [])
    if not rows:
        return
    generator = torch.Generator().manual_seed(config.seed)
    change = (decoupled - protection.images).flatten(1)
    order = torch.stack([torch.randperm(change.shape[1], generator=generator) for _ in range(change.shape[0])])
    shuffled = (protection.images + torch.gather(change, 1, order).view_as(decoupled)).clamp(0, 1)
    recognizers = load_recognizers([row["recognizer"] for row in rows], weights_dir)
    with torch.no_grad():
        ensemble = IdentityEnsemble.from_reference(recognizers, reference.images, reference.landmarks, config.tau)
        control = ensemble.score(shuffled, protection.landmarks).per_recognizer.mean(0)
    by_name = dict(zip(ensemble.names, control.tolist()))
    for row in rows:
        row["control"] = round(by_name[row["recognizer"]], 4)


def demo_notes(held_out: list[str]) -> list[str]:
    notes = ["Demo data: the private set is crops, mirror images, small rotations and colour changes of "
             "ONE face from a sample photo that ships with the insightface package; the diffusion model "
             "is the built-in tiny model (random UNet). It shows the pipeline and the identity "
             "decoupling of the training photos under real face recognizers; portrait quality and "
             "likeness of generations need a real Stable Diffusion checkpoint."]
    if not held_out:
        notes.append("No held-out evaluator was available (only the surrogate's weights were found). To "
                     "measure transfer honestly, put a second recognizer's weights, e.g. "
                     "mobilefacenet.safetensors, in the weights folder ($IDDM_WEIGHTS_DIR or --weights-dir).")
    return notes
