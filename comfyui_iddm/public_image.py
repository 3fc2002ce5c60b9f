"""Images for publishing: the pixels and nothing else.

The stock ComfyUI Save Image node writes the whole prompt and workflow (every widget value: photo
folder, LoRA name, prompts) into each PNG. These writers add no text chunk, EXIF, XMP, ICC profile
or comment: a PNG holds only IHDR/IDAT/IEND, a JPEG only its JFIF header, a WebP only its bitstream.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .atomic import write_bytes

FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def to_uint8(image) -> np.ndarray:
    """One image [H,W,C] with values in [0,1] (numpy or torch, C = 1, 3 or 4) -> [H,W,3] uint8 RGB."""
    array = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, np.float32)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected one image [H,W,C] with C = 1, 3 or 4, got shape {array.shape}.")
    array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
    return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_public_image(pixels: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """[H,W,3] uint8 -> file bytes without any metadata. `quality` (1-100) is for jpeg/webp."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}.")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality {quality} must be between 1 and 100.")
    image = Image.fromarray(pixels, "RGB")  # a fresh image: no info dict, nothing to carry over
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, "PNG", compress_level=4)
    elif fmt == "jpeg":
        image.save(buffer, "JPEG", quality=int(quality), optimize=True)
    else:
        image.save(buffer, "WEBP", quality=int(quality), method=4)
    return buffer.getvalue()


def save_public_images(images: Sequence, folder: Path, stem: str, counter: int, fmt: str = "png",
                       quality: int = 95) -> list[str]:
    """Writes each image as `<stem>_<counter:05>_.<ext>` (ComfyUI's naming; `%batch_num%` in the
    stem becomes the image's index), counting up from `counter`. Returns the file names."""
    names = []
    for index, image in enumerate(images):
        name = f"{stem.replace('%batch_num%', str(index))}_{counter + index:05}_{FORMATS[fmt]}"
        write_public_image(Path(folder) / name, image, fmt, quality)
        names.append(name)
    return names


def write_public_image(path: Path, image, fmt: str = "png", quality: int = 95) -> None:
    """One image [H,W,C] in [0,1] written atomically to `path`, pixels only."""
    write_bytes(Path(path), encode_public_image(to_uint8(image), fmt, quality))
