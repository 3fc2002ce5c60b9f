"""The face region of a photo: the pixels the face recognizers look at.

Each recognizer sees the photo through a similarity warp of the 5 landmarks onto the ArcFace
112x112 template (align.py). The region is the disc inscribed in that square, mapped back into the
photo (same transform, same pixel convention): the face, without the square's corners of hair and
background. It is widened by `margin` of the square's side and feathered over `feather` of it, so a
perturbation limited to it changes no background pixel and leaves no visible edge.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .align import similarity_transform
from .templates import ARCFACE_112

TEMPLATE_SIDE = 112


def face_region(landmarks: Tensor, height: int, width: int, margin: float = 0.0,
                feather: float = 0.15) -> Tensor:
    """[B,5,2] landmarks in pixels -> [B,1,H,W] weights in [0,1]: 1 on the disc inscribed in the
    aligned face square (grown by `margin`), falling to 0 over `feather` (fractions of its side)."""
    matrix = similarity_transform(landmarks.float(), ARCFACE_112)  # photo pixels -> template pixels
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=landmarks.device),
                            torch.arange(width, dtype=torch.float32, device=landmarks.device), indexing="ij")
    pixels = torch.stack([xs, ys, torch.ones_like(xs)]).reshape(3, -1)  # [3, H*W]
    template_xy = (matrix @ pixels) / TEMPLATE_SIDE  # [B, 2, H*W], the face square is [0, 1]^2
    outside = torch.relu((template_xy - 0.5).norm(dim=1) - 0.5 - margin)  # 0 inside the disc, then distance
    weights = torch.clamp(1 - outside / feather, 0.0, 1.0)
    return weights.reshape(-1, 1, height, width)
