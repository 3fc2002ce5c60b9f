"""A cloaked face crop put back into the photo it was cut from: the photo a person posts carries the cloak.

Only the change is carried back. It is resampled onto the photo's own pixels inside the crop's square
(bilinear, grid_sample with align_corners=False: photo pixel j, centre j + 0.5 in Pillow's convention,
sits at crop coordinate 2 (j + 0.5 - left) / side - 1), added and clipped to [0, 1]. Bilinear weights are
non-negative and sum to at most 1, so no pixel moves by more than the cloak's budget; pixels outside the
square are not touched.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .photos import CropBox, PhotoSet, list_photo_files, pil_to_tensor, read_image, tensor_to_pil


def paste_change(photo: Tensor, change: Tensor, box: CropBox) -> Tensor:
    """photo [3,H,W] in [0,1] with `change` [3,R,R] (cloaked crop - crop) added inside `box`."""
    _, height, width = photo.shape
    x0, x1 = max(0, math.floor(box.left)), min(width, math.ceil(box.left + box.side))
    y0, y1 = max(0, math.floor(box.top)), min(height, math.ceil(box.top + box.side))
    xs = (torch.arange(x0, x1, dtype=torch.float32) + 0.5 - box.left) * 2 / box.side - 1
    ys = (torch.arange(y0, y1, dtype=torch.float32) + 0.5 - box.top) * 2 / box.side - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]  # [1, rows, cols, (x, y)]
    moved = F.grid_sample(change[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    pasted = photo.clone()
    pasted[:, y0:y1, x0:x1] = (photo[:, y0:y1, x0:x1] + moved).clamp(0, 1)
    return pasted


def cloaked_photos(folder: Path, photos: PhotoSet, cloaked: Tensor) -> Iterator[Tensor]:
    """Each photo of `photos` (loaded from `folder` by load_photo_folder) read again, one at a time,
    with its cloaked crop's change pasted in: [3,H,W] at the size it was loaded at."""
    files, _ = list_photo_files(folder)
    for number, box, crop, cloak in zip(photos.numbers, photos.crop_boxes, photos.images, cloaked, strict=True):
        yield paste_change(pil_to_tensor(read_image(files[number - 1])), cloak - crop, box)


def kept_share(pasted: Tensor, box: CropBox, crop: Tensor, cloaked: Tensor) -> float:
    """How much of the cloak a personalization's own crop of the posted photo still holds: the cosine
    between the change it sees (the posted photo cut and resized as the crop was, minus the crop) and the
    cloak's change. 1 = all of it; less after 8-bit rounding and where the photo's square is smaller than
    the crop (the change was resampled)."""
    seen = pil_to_tensor(box.cut(tensor_to_pil(pasted), crop.shape[-1])) - crop
    return float(F.cosine_similarity(seen.flatten(), (cloaked - crop).flatten(), dim=0))
