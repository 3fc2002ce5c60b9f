"""Real sample photos that ship inside installed packages (for the demo, tests and benchmarks).

insightface's wheel carries data/images/t1.jpg (a group photo of 6 different people) and
Tom_Hanks_54745.png (one face). They are located without importing insightface (its import pulls in
heavy optional dependencies), and returned as PIL images.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image, ImageOps

GROUP_PHOTO = "t1.jpg"  # 6 different people
SINGLE_FACE = "Tom_Hanks_54745.png"
INSTALL_HINT = "pip install --no-deps insightface  (only its bundled sample photos are used)"


def sample_image_dir() -> Path:
    spec = importlib.util.find_spec("insightface")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        images = Path(folder) / "data" / "images"
        if images.is_dir():
            return images
    raise FileNotFoundError(f"the sample photos come with the insightface package, which is not "
                            f"installed: {INSTALL_HINT}")


def sample_photo_path(name: str) -> Path:
    path = sample_image_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"sample photo {name} is missing from the installed insightface "
                                f"package; reinstall it: {INSTALL_HINT}")
    return path


def load_sample_photo(name: str) -> Image.Image:
    with Image.open(sample_photo_path(name)) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def group_photo() -> Image.Image:
    """t1.jpg: 6 different people, faces about 100 px across."""
    return load_sample_photo(GROUP_PHOTO)


def single_face_photo() -> Image.Image:
    return load_sample_photo(SINGLE_FACE)
