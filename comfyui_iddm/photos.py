"""Private photos in: read any common image safely, crop around the face, split into Xc / X0.

Names of the user's files stay in memory (for messages on the user's own terminal or node);
nothing here writes anything to disk. Photos are read, cropped and released one at a time, so a
folder of large photos costs one decoded photo plus the small crops.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .faces.detect import FaceDetection
from .faces.templates import ARCFACE_112, scaled_template

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif"}
# Common photo formats Pillow cannot read: named in the message so the user knows what to do.
UNSUPPORTED_SUFFIXES = {
    ".heic": "HEIC photos cannot be read; export them as JPEG (iPhone: Settings > Camera > Formats > "
             "Most Compatible)",
    ".heif": "HEIF photos cannot be read; export them as JPEG",
    **{s: "camera RAW files cannot be read; export them as JPEG or PNG"
       for s in (".cr2", ".cr3", ".nef", ".arw", ".dng", ".orf", ".rw2", ".raf", ".raw")},
}
# Photos are scaled down to at most this side while decoding (JPEG: by the decoder itself), so a
# 12000x9000 photo never costs 400 MB.
MAX_LOAD_SIDE = 2048
# Formats that cannot be scaled while decoding (PNG, WebP, ...) are refused above this many pixels
# (about 200 MB decoded) instead of risking the machine's memory.
MAX_DECODE_PIXELS = 50_000_000
# Faces whose box is smaller than this (pixels, in the photo as loaded) carry too little identity.
MIN_FACE_SIDE = 40
# With several faces, the largest is used only if the next one is at most this fraction of its side;
# otherwise it is unclear whose photo it is and the photo is skipped.
SECOND_FACE_RATIO = 0.6
# The square crop is this many times the face box, so hair, chin and some background stay in view.
CROP_SCALE = 2.0
# Two crops closer than this in every pixel are the same photo (8-bit rounding of a re-read).
SAME_PHOTO_TOLERANCE = 1.5 / 255

_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the photo upright (the EXIF standard's table).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


class PhotoError(ValueError):
    """A problem with the user's photos that stops the run; the message says what to do."""


class UnreadablePhoto(PhotoError):
    """One photo cannot be used; the caller skips it and reports `reason` with the photo's name."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


@dataclass(frozen=True)
class PhotoIssue:
    index: int | None  # position among the images given (None: a file that is not an image)
    name: str  # the user's file name: shown to the user, never persisted
    reason: str
    skipped: bool = True


@dataclass
class PhotoSet:
    images: Tensor  # [N,3,R,R] in [0,1], face-centred square crops
    landmarks: Tensor  # [N,5,2] in crop pixels (pixel centres at integers): eyes, nose, mouth corners
    names: list[str] = field(default_factory=list)  # in memory only
    scores: Tensor | None = None  # detector confidence x face size, for "best faces" splits
    issues: list[PhotoIssue] = field(default_factory=list)
    # 1-based position of each photo among the images given (a folder's image files in name order):
    # what messages that may be kept call a photo ("photo 3"), never its file name.
    numbers: list[int] = field(default_factory=list)
    crop_boxes: list["CropBox"] = field(default_factory=list)  # where each crop lies in its photo

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Sequence[int]) -> "PhotoSet":
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return PhotoSet(self.images[idx], self.landmarks[idx], [self.names[i] for i in idx.tolist()],
                        None if self.scores is None else self.scores[idx], [],
                        [self.numbers[i] for i in idx.tolist()] if self.numbers else [],
                        [self.crop_boxes[i] for i in idx.tolist()] if self.crop_boxes else [])


# --- reading one photo ---------------------------------------------------------------------------
def read_image(path: Path) -> Image.Image:
    """One photo upright (EXIF orientation) as 8-bit RGB, at most MAX_LOAD_SIDE per side.

    Handles alpha (over white), grey, palette, CMYK, 16-bit, and animations (first frame).
    Raises UnreadablePhoto with a reason the user can act on.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns about large images; the size is checked below after the decoder's scaling.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.draft("RGB", (MAX_LOAD_SIDE, MAX_LOAD_SIDE))  # JPEG: decode at 1/2..1/8 size
                width, height = img.size
                if width * height > MAX_DECODE_PIXELS:
                    raise UnreadablePhoto(path.name, (
                        f"{width}x{height} pixels is too large to read safely (limit "
                        f"{MAX_DECODE_PIXELS // 1_000_000} megapixels for {img.format}); save it as "
                        f"JPEG or scale it down to at most {MAX_LOAD_SIDE} px per side"))
                orientation = _exif_orientation(img)
                img.seek(0)  # animated GIF/WebP/PNG: the first frame
                img.load()
                rgb = to_rgb8(img)
    except UnreadablePhoto:
        raise
    except Image.DecompressionBombError:
        raise UnreadablePhoto(path.name, "the image is far too large to read safely (over 179 "
                                         f"megapixels); scale it down to at most {MAX_LOAD_SIDE} px "
                                         "per side") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure means "this file is unusable"
        raise UnreadablePhoto(path.name, f"not a readable image ({err.__class__.__name__}: {err}); "
                                         "re-save it as JPEG or PNG, or remove it") from None
    transpose = _UPRIGHT.get(orientation)
    return rgb.transpose(transpose) if transpose is not None else rgb


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - broken EXIF: the pixels may still be fine; keep them as stored
        return 1


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB with alpha flattened onto white, longest side <= MAX_LOAD_SIDE.

    Scales down first, so every later conversion works on the small image."""
    if img.mode in ("P", "PA", "1"):
        has_alpha = img.mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    if max(img.size) > MAX_LOAD_SIDE:
        scale = MAX_LOAD_SIDE / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _high_depth_grey_to_l(img)
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def _high_depth_grey_to_l(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit int/float) grey -> 8-bit; Pillow's own conversion clips at 255 (white)."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        peak = 65535.0
    elif img.mode == "F":
        peak = 1.0 if arr.max() <= 1.0 else 255.0
    else:  # "I": 16-bit PNGs in older Pillow, or 8-bit values widened
        peak = 65535.0 if arr.max() > 255 else 255.0
    return Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def pil_to_tensor(img: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def tensor_to_pil(image: Tensor) -> Image.Image:
    arr = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(arr)


# --- a folder of photos -------------------------------------------------------------------------
def list_photo_files(folder: Path) -> tuple[list[Path], list[PhotoIssue]]:
    """Image files of the folder (sorted; hidden files ignored), and the other files as issues."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PhotoError(f"photo folder {folder} does not exist or is not a folder; give the folder "
                         "that holds the person's photos.")
    files, issues = [], []
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()):
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            files.append(path)
        elif suffix in UNSUPPORTED_SUFFIXES:
            issues.append(PhotoIssue(None, path.name, UNSUPPORTED_SUFFIXES[suffix] + " (skipped)"))
        else:
            issues.append(PhotoIssue(None, path.name, "not an image file (skipped)"))
    if not files:
        skipped = f" ({len(issues)} other file(s) skipped)" if issues else ""
        raise PhotoError(f"photo folder {folder} holds no images (JPEG, PNG or WebP){skipped}; put the "
                         "person's photos there (8 or more clear, front-facing portraits work best).")
    return files, issues


def load_photo_folder(folder: Path, resolution: int, detector=None) -> PhotoSet:
    """Every usable photo of the folder, face-centred and resized; problems listed in `issues`
    (unreadable files, faces not found, duplicates) instead of stopping the run."""
    files, issues = list_photo_files(folder)

    def readable() -> Iterator[tuple[int, str, Image.Image]]:
        for index, path in enumerate(files):
            try:
                yield index, path.name, read_image(path)
            except UnreadablePhoto as err:
                issues.append(PhotoIssue(index, path.name, err.reason + " (skipped)"))

    photos = crop_faces(readable(), resolution, detector, issues)
    if len(photos) == 0:
        reasons = "; ".join(f"{i.name}: {i.reason}" for i in photos.issues)
        raise PhotoError(f"no usable photo in {Path(folder).name} ({reasons}). Add clear photos of the "
                         "person's face (one face per photo, at least "
                         f"{MIN_FACE_SIDE} px across).")
    return photos


def photoset_from_images(images: Tensor, resolution: int, detector=None,
                         names: Sequence[str] | None = None) -> PhotoSet:
    """Same as load_photo_folder for images already in memory ([N,3,H,W] in [0,1]); photos without a
    usable face are left out and listed in `issues` (names default to "image <i>")."""
    names = list(names) if names is not None else [f"image {i}" for i in range(images.shape[0])]
    return crop_faces(((i, name, tensor_to_pil(img)) for i, (img, name) in enumerate(zip(images, names))),
                      resolution, detector)


# --- face-centred crops ---------------------------------------------------------------------------

def crop_faces(photos: Iterable[tuple[int, str, Image.Image]], resolution: int, detector=None,
               issues: list[PhotoIssue] | None = None) -> PhotoSet:
    """Square crop around the face of each (index, name, photo), resized to `resolution`.

    Without a detector the face is assumed centred (tests, pre-cropped portraits) and the landmarks
    are the canonical template scaled to the crop. Photos without one clear face, and repeats of an
    earlier photo, are skipped and listed in the returned set's `issues`.
    """
    issues = [] if issues is None else issues
    crops, landmarks, scores, kept, numbers, boxes = [], [], [], [], [], []
    for index, name, img in photos:
        if min(img.size) < MIN_FACE_SIDE:
            issues.append(PhotoIssue(index, name, f"only {img.width}x{img.height} px; a face photo needs "
                                                  f"at least {MIN_FACE_SIDE} px on each side (skipped)"))
            continue
        face = centred_face(img.size) if detector is None else _main_face(detector, img, index, name, issues)
        if face is None:
            continue
        square = crop_box(img.size, face.box)
        tensor = pil_to_tensor(square.cut(img, resolution))
        earlier = _same_photo_index(tensor, crops)
        if earlier is not None:
            issues.append(PhotoIssue(index, name, f"the same photo as {kept[earlier]} (skipped)"))
            continue
        crops.append(tensor)
        landmarks.append(torch.as_tensor(square.map_points(face.landmarks, resolution), dtype=torch.float32))
        scores.append(face.score * _side(face.box))
        kept.append(name)
        numbers.append(index + 1)
        boxes.append(square)
    if not crops:
        empty = torch.zeros(0, 3, resolution, resolution)
        return PhotoSet(empty, torch.zeros(0, 5, 2), [], torch.zeros(0), issues)
    return PhotoSet(torch.stack(crops), torch.stack(landmarks), kept, torch.tensor(scores), issues, numbers, boxes)


def _side(box) -> float:
    return float(max(box[2] - box[0], box[3] - box[1]))


def _main_face(detector, img: Image.Image, index: int, name: str,
               issues: list[PhotoIssue]) -> FaceDetection | None:
    """The person's face: the only one, or one clearly larger than the others; None = skip."""
    faces = sorted(detector.detect(pil_to_tensor(img)[None])[0], key=lambda f: -_side(f.box))
    if not faces:
        issues.append(PhotoIssue(index, name, "no face found (skipped)"))
        return None
    main = faces[0]
    if len(faces) > 1 and _side(faces[1].box) > SECOND_FACE_RATIO * _side(main.box):
        issues.append(PhotoIssue(index, name, f"{len(faces)} faces of similar size; use photos of the "
                                              "person alone, or crop the others out (skipped)"))
        return None
    if _side(main.box) < MIN_FACE_SIDE:
        issues.append(PhotoIssue(index, name, f"the face is too small ({_side(main.box):.0f} px; need "
                                              f"{MIN_FACE_SIDE}+ px; use a closer or larger photo) "
                                              "(skipped)"))
        return None
    if len(faces) > 1:
        issues.append(PhotoIssue(index, name, f"{len(faces)} faces found; using the largest", skipped=False))
    return FaceDetection(tuple(float(v) for v in main.box), np.asarray(main.landmarks, dtype=np.float64),
                 float(main.score))


def centred_face(size: tuple[int, int]) -> FaceDetection:
    """No detector: a face box in the middle of the photo, landmarks where ArcFace's template puts them."""
    w, h = size
    side = min(w, h) / CROP_SCALE
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    template = scaled_template(ARCFACE_112, 112, 1).numpy().astype(np.float64)  # in a 1-pixel box
    points = np.array(box[:2]) + (template + 0.5) * side - 0.5
    return FaceDetection(box, points, 1.0)


@dataclass(frozen=True)
class CropBox:
    """Where a face crop was cut from its photo (as loaded: upright, at most MAX_LOAD_SIDE per side), in
    Pillow's box convention: pixel i spans [i, i+1), so the square is [left, left+side) x [top, top+side)."""
    left: float
    top: float
    side: float

    def cut(self, img: Image.Image, resolution: int) -> Image.Image:
        """The square of `img`, resized to resolution x resolution as every face crop is (Lanczos)."""
        return img.resize((resolution, resolution), Image.Resampling.LANCZOS,
                          box=(self.left, self.top, self.left + self.side, self.top + self.side))

    def map_points(self, points: np.ndarray, resolution: int) -> np.ndarray:
        """Points of the photo in the crop `cut` makes (pixel centres at integers on both sides)."""
        return (np.asarray(points) + 0.5 - np.array([self.left, self.top])) * (resolution / self.side) - 0.5


def crop_box(size: tuple[int, int], face_box) -> CropBox:
    """A square of CROP_SCALE x the face box around its centre, moved (and shrunk) to stay inside the photo."""
    w, h = size
    cx, cy = (face_box[0] + face_box[2]) / 2, (face_box[1] + face_box[3]) / 2
    side = min(_side(face_box) * CROP_SCALE, w, h)
    return CropBox(min(max(cx - side / 2, 0), w - side), min(max(cy - side / 2, 0), h - side), side)


def square_crop(img: Image.Image, box, points: np.ndarray, resolution: int) -> tuple[Image.Image, np.ndarray]:
    """The crop_box of the face box, resized to `resolution`; the landmarks mapped into it (pixel
    centres at integers on both sides)."""
    square = crop_box(img.size, box)
    return square.cut(img, resolution), square.map_points(points, resolution)


def _same_photo_index(crop: Tensor, crops: list[Tensor]) -> int | None:
    for i, other in enumerate(crops):
        if float((other - crop).abs().max()) < SAME_PHOTO_TOLERANCE:
            return i
    return None


# --- reference / protection split --------------------------------------------------------------
SplitMode = Literal["order", "random", "best"]


def split_photos(photos: PhotoSet, n_reference: int, mode: SplitMode = "order",
                 seed: int = 0) -> tuple[PhotoSet, PhotoSet]:
    """Disjoint reference set Xc (n_reference photos) and protection set X0 (the rest)."""
    n = len(photos)
    if n < 2:
        raise PhotoError(f"{n} usable photo(s); IDDM needs at least 2 (a reference set and a protection "
                         "set; the paper uses 4 + 4). Add photos of the same person.")
    if not 1 <= n_reference <= n - 1:
        raise PhotoError(f"reference count {n_reference} leaves an empty set with {n} usable photos; "
                         f"choose between 1 and {n - 1} (e.g. {n // 2}).")
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
        if bool((flat_ref - photo).abs().amax(dim=1).lt(SAME_PHOTO_TOLERANCE).any()):
            raise PhotoError(f"protection photo {i + 1} is also in the reference set; the two sets must "
                             "be disjoint. Give each photo to only one of them.")
