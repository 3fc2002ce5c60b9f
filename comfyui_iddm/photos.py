"""Private photos in: read any common image safely, crop around the face, split into Xc / X0.

Names of the user's files stay in memory (for messages on the user's own terminal or node);
nothing here writes anything to disk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# Photos larger than this are downscaled while decoding, so a 12000x9000 photo never costs 400 MB.
MAX_LOAD_SIDE = 2048
# Faces whose box is smaller than this (pixels, in the original photo) carry too little identity.
MIN_FACE_SIDE = 40
# The square crop is this many times the face box, so hair, chin and some background stay in view.
CROP_SCALE = 2.0


class PhotoError(ValueError):
    """A problem with the user's photos that stops the run; the message says what to do."""


@dataclass(frozen=True)
class PhotoIssue:
    index: int | None  # position in the folder listing (None: about the folder itself)
    name: str  # the user's file name: shown to the user, never persisted
    reason: str
    skipped: bool = True


@dataclass
class PhotoSet:
    images: Tensor  # [N,3,R,R] in [0,1], face-centred square crops
    landmarks: Tensor  # [N,5,2] in crop pixels: eyes, nose, mouth corners
    names: list[str] = field(default_factory=list)  # in memory only
    scores: Tensor | None = None  # detector confidence x face size, for "best faces" splits
    issues: list[PhotoIssue] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Sequence[int]) -> "PhotoSet":
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return PhotoSet(self.images[idx], self.landmarks[idx], [self.names[i] for i in idx.tolist()],
                        None if self.scores is None else self.scores[idx], [])


def read_image(path: Path) -> Image.Image:
    """Read one photo upright as 8-bit RGB: EXIF orientation, alpha, grey, CMYK, 16-bit, animations."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (MAX_LOAD_SIDE, MAX_LOAD_SIDE))  # JPEG: decode at reduced size
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated GIF/WebP: the first frame
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb8(img)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise PhotoError(f"{path.name}: not a readable image ({err.__class__.__name__}: {err}); "
                         "re-save it as JPEG or PNG, or remove it from the folder.") from None


def to_rgb8(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if max(img.size) > MAX_LOAD_SIDE:
        img = img.copy()
        img.thumbnail((MAX_LOAD_SIDE, MAX_LOAD_SIDE), Image.Resampling.LANCZOS)
    return img.convert("RGB")


def pil_to_tensor(img: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def tensor_to_pil(image: Tensor) -> Image.Image:
    arr = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(arr)


def list_photo_files(folder: Path) -> tuple[list[Path], list[PhotoIssue]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise PhotoError(f"photo folder {folder} does not exist or is not a folder; give the folder "
                         "that holds the person's photos.")
    files, issues = [], []
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
        elif path.is_file():
            issues.append(PhotoIssue(None, path.name, "not an image file (skipped)"))
    if not files:
        raise PhotoError(f"photo folder {folder} holds no images (JPEG, PNG or WebP); put the person's "
                         "photos there (8 or more clear, front-facing portraits work best).")
    return files, issues


def load_photo_folder(folder: Path, resolution: int, detector=None) -> PhotoSet:
    """Every readable photo of the folder, face-centred and resized; problems listed in `issues`."""
    files, issues = list_photo_files(folder)
    images, names = [], []
    for path in files:
        try:
            images.append(read_image(path))
            names.append(path.name)
        except PhotoError as err:
            issues.append(PhotoIssue(None, path.name, str(err).split(": ", 1)[1]))
    photos = crop_faces(images, names, resolution, detector)
    photos.issues = issues + photos.issues
    if len(photos) == 0:
        reasons = "; ".join(f"{i.name}: {i.reason}" for i in photos.issues)
        raise PhotoError(f"no usable photo in {Path(folder).name} ({reasons}).")
    return photos


def photoset_from_images(images: Tensor, resolution: int, detector=None,
                         names: Sequence[str] | None = None) -> PhotoSet:
    """Same as load_photo_folder for images already in memory ([N,3,H,W] in [0,1])."""
    names = list(names) if names is not None else [f"image {i}" for i in range(images.shape[0])]
    return crop_faces([tensor_to_pil(img) for img in images], names, resolution, detector)


def crop_faces(images: list[Image.Image], names: list[str], resolution: int, detector=None) -> PhotoSet:
    """Square crop around the main face of each photo, resized to `resolution`.

    Without a detector the face is assumed centred (tests, pre-cropped portraits) and the landmarks
    are the canonical template scaled to the crop.
    """
    crops, landmarks, scores, kept, issues = [], [], [], [], []
    for index, (img, name) in enumerate(zip(images, names)):
        if detector is None:
            box, points, score = centred_face(img.size)
        else:
            faces = detector.detect(pil_to_tensor(img)[None])[0]
            if not faces:
                issues.append(PhotoIssue(index, name, "no face found (skipped)"))
                continue
            best = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) * f.score)
            if len(faces) > 1:
                issues.append(PhotoIssue(index, name, f"{len(faces)} faces found; using the largest",
                                         skipped=False))
            box, points, score = best.box, np.asarray(best.landmarks, dtype=np.float64), float(best.score)
            side = max(box[2] - box[0], box[3] - box[1])
            if side < MIN_FACE_SIDE:
                issues.append(PhotoIssue(index, name, f"face too small ({side:.0f} px; need "
                                                      f"{MIN_FACE_SIDE}+ px) (skipped)"))
                continue
        crop, points = square_crop(img, box, points, resolution)
        crops.append(pil_to_tensor(crop))
        landmarks.append(torch.as_tensor(points, dtype=torch.float32))
        scores.append(score * float(box[2] - box[0]))
        kept.append(name)
    if not crops:
        empty = torch.zeros(0, 3, resolution, resolution)
        return PhotoSet(empty, torch.zeros(0, 5, 2), [], torch.zeros(0), issues)
    return PhotoSet(torch.stack(crops), torch.stack(landmarks), kept, torch.tensor(scores), issues)


# ArcFace's 112x112 five-point template, used to place assumed landmarks when there is no detector.
_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                          [41.5493, 92.3655], [70.7299, 92.2041]])


def centred_face(size: tuple[int, int]):
    w, h = size
    side = min(w, h) / CROP_SCALE
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    points = np.array(box[:2]) + _TEMPLATE_112 / 112.0 * side
    return box, points, 1.0


def square_crop(img: Image.Image, box, points: np.ndarray, resolution: int):
    w, h = img.size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = min(max(box[2] - box[0], box[3] - box[1]) * CROP_SCALE, w, h)
    left = min(max(cx - side / 2, 0), w - side)
    top = min(max(cy - side / 2, 0), h - side)
    crop = img.resize((resolution, resolution), Image.Resampling.LANCZOS,
                      box=(left, top, left + side, top + side))
    scale = resolution / side
    return crop, (points - np.array([left, top])) * scale


SplitMode = Literal["order", "random", "best"]


def split_photos(photos: PhotoSet, n_reference: int, mode: SplitMode = "order",
                 seed: int = 0) -> tuple[PhotoSet, PhotoSet]:
    """Disjoint reference set Xc (n_reference photos) and protection set X0 (the rest)."""
    n = len(photos)
    if n < 2:
        raise PhotoError(f"{n} usable photo(s); IDDM needs at least 2 (a reference set and a protection "
                         "set; the paper uses 4 + 4). Add photos of the same person.")
    if not 1 <= n_reference <= n - 1:
        raise PhotoError(f"reference count {n_reference} leaves an empty set with {n} photos; choose "
                         f"between 1 and {n - 1} (e.g. {n // 2}).")
    if mode == "order":
        order = list(range(n))
    elif mode == "random":
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    elif mode == "best":
        if photos.scores is None:
            raise PhotoError("'best' split needs detector scores; load the photos with a face detector.")
        order = torch.argsort(photos.scores, descending=True, stable=True).tolist()
    else:
        raise PhotoError(f"split mode {mode!r} is unknown; use 'order', 'random' or 'best'.")
    return photos.subset(order[:n_reference]), photos.subset(order[n_reference:])


def assert_disjoint(reference: Tensor, protection: Tensor) -> None:
    """The paper's Xc and X0 are disjoint; an identical photo in both would leak X0's identity into Xc."""
    flat_ref = reference.flatten(1)
    for i, photo in enumerate(protection.flatten(1)):
        if bool((flat_ref - photo).abs().amax(dim=1).lt(1.5 / 255).any()):
            raise PhotoError(f"protection photo {i} is also in the reference set; the two sets must be "
                             "disjoint. Split the photos again without overlap.")

