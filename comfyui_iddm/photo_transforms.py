"""What can happen to published photos before an attacker fine-tunes on them: a platform shrinks them
and re-encodes them as JPEG, and the attacker scales them back up to the training size. Cloaks are
known to break under this; a protected model does not depend on the photos at all. The evaluation
applies it to whatever photos the attacker gets (cloaked or clean), with --attacker-transform.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from .config import ConfigError
from .photos import pil_to_tensor, tensor_to_pil

EXAMPLE = "jpeg:75,resize:0.5"


@dataclass(frozen=True)
class PhotoTransform:
    jpeg_quality: int | None = None  # 1-100
    resize: float | None = None  # the side shrinks to this share (then back up to the training size)

    @classmethod
    def parse(cls, text: str) -> "PhotoTransform":
        """'none', or comma-separated 'jpeg:Q' and 'resize:S' (e.g. 'jpeg:75,resize:0.5')."""
        values: dict[str, float] = {}
        for part in (p.strip() for p in text.split(",") if p.strip() and p.strip() != "none"):
            name, _, value = part.partition(":")
            try:
                number = float(value)
            except ValueError:
                number = None
            if name not in ("jpeg", "resize") or number is None or name in values:
                raise ConfigError(f"attacker transform {part!r} is not one of jpeg:QUALITY or resize:SHARE "
                                  f"(each once), e.g. {EXAMPLE!r}, or 'none'.")
            values[name] = number
        quality, share = values.get("jpeg"), values.get("resize")
        if quality is not None and not (1 <= quality <= 100 and quality == int(quality)):
            raise ConfigError(f"jpeg:{quality:g}: the JPEG quality is a whole number from 1 to 100.")
        if share is not None and not 0.05 <= share < 1:
            raise ConfigError(f"resize:{share:g}: the share of the side is at least 0.05 and below 1.")
        return cls(int(quality) if quality is not None else None, share)

    @property
    def label(self) -> str:
        parts = ([f"resize {self.resize:g}"] if self.resize else []) + (
            [f"JPEG q{self.jpeg_quality}"] if self.jpeg_quality else [])
        return " + ".join(parts) or "none"

    def apply(self, photos: Tensor) -> Tensor:
        """[N,3,R,R] in [0,1] -> the same size after shrinking, JPEG and scaling back up."""
        if self.jpeg_quality is None and self.resize is None:
            return photos
        return torch.stack([pil_to_tensor(self._one(tensor_to_pil(photo))) for photo in photos.cpu()]).to(photos.device)

    def _one(self, image: Image.Image) -> Image.Image:
        size = image.size
        if self.resize:
            image = image.resize((max(8, round(size[0] * self.resize)), max(8, round(size[1] * self.resize))),
                                 Image.Resampling.BICUBIC)
        if self.jpeg_quality:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=self.jpeg_quality)
            image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        return image.resize(size, Image.Resampling.BICUBIC) if image.size != size else image
