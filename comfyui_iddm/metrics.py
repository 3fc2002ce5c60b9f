"""Identity and image-quality metrics (the Identity Similarity node, the CLI, the benchmarks).

- FSR: share of images in which a face is detected.
- Identity similarity: cosine of each face to the person's prototype, per recognizer, and the mean
  over detected faces (the paper's ISM / ADA are this with ArcFace / AdaFace as evaluator).
- Top-k retrieval (R1/R5) against a gallery of identity prototypes.
- PSNR and SSIM of X' against X; LPIPS only when its backbone is already on this machine.
A held-out evaluator must not also be a surrogate: `evaluator_overlap` warns when it is.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .faces.detect import FaceDetection
from .faces.ensemble import IdentityEnsemble

# ----------------------------------------------------------------------------- identity


def face_success_rate(detections: Sequence[Sequence[FaceDetection]]) -> float:
    """FSR: the fraction of images with at least one detected face."""
    if not detections:
        raise ValueError("face_success_rate needs at least one image.")
    return sum(1 for faces in detections if faces) / len(detections)


@dataclass
class IdentityReport:
    names: tuple[str, ...]  # recognizers, in column order
    per_image: list[list[float] | None]  # per image: cosine per recognizer, None = no face found
    fsr: float

    @property
    def mean(self) -> dict[str, float | None]:
        """Mean cosine per recognizer over the images where a face was found."""
        found = [row for row in self.per_image if row is not None]
        return {name: (sum(row[m] for row in found) / len(found) if found else None)
                for m, name in enumerate(self.names)}


@torch.no_grad()
def identity_similarity(ensemble: IdentityEnsemble, images: Sequence[Tensor],
                        detections: Sequence[Sequence[FaceDetection]]) -> IdentityReport:
    """Cosine of the best face of each image to each recognizer's prototype in `ensemble`.

    images: one [3,H,W] tensor per image (sizes may differ); detections: the detector's output.
    """
    if len(images) != len(detections):
        raise ValueError(f"{len(images)} images but {len(detections)} detection lists.")
    per_image: list[list[float] | None] = []
    device = ensemble.prototypes[0].device
    for image, faces in zip(images, detections):
        if not faces:
            per_image.append(None)
            continue
        landmarks = torch.as_tensor(faces[0].landmarks, dtype=torch.float32)[None].to(device)
        s = ensemble.similarities(image[None].to(device), landmarks)[0]
        per_image.append([float(v) for v in s])
    return IdentityReport(ensemble.names, per_image, face_success_rate(detections))


DETECT_BATCH = 16  # images per face-detector call: memory stays bounded for any number of images


@torch.no_grad()
def similarity_to_reference(recognizer, detector, generated: Tensor, reference: Tensor,
                            detect_batch: int = DETECT_BATCH) -> dict:
    """FSR and each generated image's cosine to the person's prototype (built from `reference`)
    under one recognizer. Streams: detection in batches, one face embedded at a time, so memory
    beyond the inputs does not grow with the number of generated images."""
    from .faces.detect import landmarks_tensor

    device = next(recognizer.parameters()).device
    ref_landmarks = landmarks_tensor(detector.detect(reference))
    ensemble = IdentityEnsemble.from_reference([recognizer], reference.to(device), ref_landmarks.to(device), 1.0)
    detections = [faces for start in range(0, generated.shape[0], detect_batch)
                  for faces in detector.detect(generated[start:start + detect_batch])]
    report = identity_similarity(ensemble, list(generated), detections)
    mean = report.mean[ensemble.names[0]]
    return {"fsr": report.fsr, "mean_similarity": round(mean, 4) if mean is not None else 0.0,
            "per_image": [round(row[0], 4) if row is not None else None for row in report.per_image]}


def retrieval_topk(queries: Tensor, gallery: Tensor, true_index: Tensor | Sequence[int] | int,
                   ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Share of queries whose true identity is among the k gallery prototypes most similar to them.

    queries [B,D] and gallery [G,D] embeddings (normalized here); true_index: the gallery row of
    each query's identity (one int for all, or [B]). Returns {k: rate}; with k >= G the rate is 1.
    """
    q, g = F.normalize(queries.float(), dim=1), F.normalize(gallery.float(), dim=1)
    truth = torch.as_tensor(true_index, dtype=torch.long).expand(q.shape[0])
    sims = q @ g.T
    # Rank = how many gallery identities score strictly higher than the true one (ties favour truth).
    rank = (sims > sims.gather(1, truth[:, None])).sum(dim=1)
    return {k: float((rank < k).float().mean()) for k in ks}


def evaluator_overlap(evaluators: Sequence[str], surrogates: Sequence[str]) -> bool:
    """True (and a warning) when an evaluator was also optimized against: its figures then measure
    the attack on that very network, not the privacy a third party would see."""
    shared = sorted(set(evaluators) & set(surrogates))
    if shared:
        warnings.warn(f"evaluator(s) {', '.join(shared)} were also surrogates in Stage II; their "
                      "similarity drop is not a held-out measure of privacy. Evaluate with a "
                      "recognizer that was not used in training.", stacklevel=2)
    return bool(shared)


# ----------------------------------------------------------------------------- image quality


def _per_image(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction={reduction!r}; use 'mean' or 'none'.")


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.shape != y.shape or x.dim() not in (3, 4):
        raise ValueError(f"need two images (or batches) of the same shape [B,C,H,W]; got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}.")
    x, y = x.detach().double(), y.detach().double()
    return (x[None], y[None]) if x.dim() == 3 else (x, y)


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0, reduction: str = "mean") -> Tensor:
    """Peak signal-to-noise ratio in dB, per image then averaged (identical images: +inf)."""
    x, y = _check_pair(x, y)
    mse = ((x - y) ** 2).flatten(1).mean(dim=1)
    return _per_image(10 * torch.log10(data_range ** 2 / mse), reduction).float()


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         reduction: str = "mean") -> Tensor:
    """Structural similarity (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1=0.01,
    K2=0.03, statistics over 'valid' windows, mean over pixels and channels, per image."""
    x, y = _check_pair(x, y)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels.")
    channels = x.shape[1]
    kernel = _gaussian_window(window, sigma, x.dtype).expand(channels, 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=channels)  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    per_image = []
    for a, b in zip(x.split(1), y.split(1)):  # one image at a time: memory stays flat for 50 x 512 px
        mu_a, mu_b = blur(a), blur(b)
        var_a = blur(a * a) - mu_a ** 2
        var_b = blur(b * b) - mu_b ** 2
        cov = blur(a * b) - mu_a * mu_b
        ssim_map = (((2 * mu_a * mu_b + c1) * (2 * cov + c2))
                    / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
        per_image.append(ssim_map.mean())
    return _per_image(torch.stack(per_image), reduction).float()


# LPIPS (Zhang et al. 2018) needs the `lpips` package and torchvision's AlexNet weights, which
# torchvision would download on first use; we never download at run time, so it is offered only
# when both are already on this machine.
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


def lpips_status() -> tuple[bool, str]:
    """(available, reason): whether LPIPS can be computed offline here."""
    import importlib.util
    if importlib.util.find_spec("lpips") is None:
        return False, "LPIPS unavailable: the lpips package is not installed (pip install lpips)."
    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    if not checkpoint.is_file():
        return False, (f"LPIPS unavailable offline: its AlexNet backbone ({ALEXNET_FILE}) is not in "
                       f"{checkpoint.parent}; run lpips once with internet access to fetch it.")
    return True, "LPIPS available (AlexNet)."


def lpips_distance(x: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """LPIPS (AlexNet) between images in [0,1]; raises RuntimeError saying why when unavailable."""
    available, reason = lpips_status()
    if not available:
        raise RuntimeError(reason)
    import lpips
    x, y = _check_pair(x, y)
    model = lpips.LPIPS(net="alex", verbose=False).eval()
    with torch.no_grad():
        d = model(x.float() * 2 - 1, y.float() * 2 - 1).flatten()
    return _per_image(d, reduction)
