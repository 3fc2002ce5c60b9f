"""The annotated grid of Identity Similarity: each image with its label (like the paper's Figure 2)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def labelled_grid(images: Tensor, labels: Sequence[str], columns: int | None = None) -> Tensor:
    """images [B,3,H,W] in [0,1] -> one grid image [1,3,H',W'] with a caption band under each tile."""
    count, _, height, width = images.shape
    if len(labels) != count:
        raise ValueError(f"{count} images but {len(labels)} labels.")
    columns = columns or min(count, max(1, math.ceil(math.sqrt(count))))
    rows = math.ceil(count / columns)
    band = max(14, height // 10)
    grid = Image.new("RGB", (columns * width, rows * (height + band)), "white")
    draw = ImageDraw.Draw(grid)
    font = _font(band - 4)
    for index, (image, label) in enumerate(zip(images, labels)):
        x, y = (index % columns) * width, (index // columns) * (height + band)
        array = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
        grid.paste(Image.fromarray(array), (x, y))
        draw.text((x + 3, y + height + 1), label, fill="black", font=font)
    out = torch.from_numpy(np.asarray(grid, dtype=np.float32) / 255.0)
    return out.permute(2, 0, 1)[None]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()
