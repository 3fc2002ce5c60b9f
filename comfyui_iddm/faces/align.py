"""Differentiable face alignment: a least-squares similarity transform from 5 detected landmarks
to a recognizer's template, applied with affine_grid + grid_sample so gradients reach the pixels.

Pixel convention: pixel (i, j) has its centre at x=j, y=i (OpenCV's; landmarks from the detectors
and the published templates use it). grid_sample runs with align_corners=False, whose normalized
coordinate u maps to pixel x = ((u + 1) * W - 1) / 2; the conversion below uses exactly that, so a
landmark lands on its template point to sub-pixel accuracy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def similarity_transform(src_landmarks: Tensor, dst_template: Tensor) -> Tensor:
    """[B,5,2] landmarks, [5,2] template -> [B,2,3] matrices M with dst ≈ M @ [x, y, 1].

    Umeyama's least-squares similarity (rotation, uniform scale, translation, no reflection);
    in 2-D it has this closed form, which is also differentiable.
    """
    src = src_landmarks.to(torch.promote_types(src_landmarks.dtype, torch.float32))
    dst = dst_template.to(src.dtype).to(src.device).expand_as(src)
    src_mean, dst_mean = src.mean(dim=1, keepdim=True), dst.mean(dim=1, keepdim=True)
    xs, ys = (src - src_mean).unbind(-1)
    xd, yd = (dst - dst_mean).unbind(-1)
    norm = (xs * xs + ys * ys).sum(dim=1)
    if bool((norm <= 1e-12).any()):
        raise ValueError("face landmarks collapse to one point; the detection is unusable.")
    a = (xs * xd + ys * yd).sum(dim=1) / norm  # s*cos(theta)
    b = (xs * yd - ys * xd).sum(dim=1) / norm  # s*sin(theta)
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], dim=1)  # [B,2,2]
    shift = dst_mean.squeeze(1) - (rot @ src_mean.squeeze(1).unsqueeze(-1)).squeeze(-1)
    return torch.cat([rot, shift.unsqueeze(-1)], dim=-1)


def _homogeneous(m: Tensor) -> Tensor:
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=m.dtype, device=m.device).expand(m.shape[0], 1, 3)
    return torch.cat([m, bottom], dim=1)


def _pixels_to_normalized(width: int, height: int, like: Tensor) -> Tensor:
    """3x3 map from pixel coordinates to grid_sample's align_corners=False coordinates."""
    return torch.tensor([[2.0 / width, 0.0, 1.0 / width - 1.0],
                         [0.0, 2.0 / height, 1.0 / height - 1.0],
                         [0.0, 0.0, 1.0]], dtype=like.dtype, device=like.device)


def align_faces(images: Tensor, landmarks: Tensor, template: Tensor, size: int) -> Tensor:
    """Warp each face so its landmarks land on `template` in a size x size crop.

    images [B,3,H,W] (differentiable), landmarks [B,5,2] in pixels of `images` (treated as
    constants: they come from the detector on the clean photo), template [5,2] in crop pixels.
    Outside the photo the crop is black (zeros), as cv2.warpAffine does for the published models.
    """
    if images.dim() != 4 or landmarks.shape != (images.shape[0], 5, 2):
        raise ValueError(f"align_faces needs images [B,3,H,W] and landmarks [B,5,2]; got "
                         f"{tuple(images.shape)} and {tuple(landmarks.shape)}.")
    _, _, height, width = images.shape
    work = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    forward = _homogeneous(similarity_transform(landmarks.detach().to(work), template.to(work)))
    crop_to_image = torch.linalg.inv(forward)  # output pixel -> source pixel
    to_norm_in = _pixels_to_normalized(width, height, forward)
    from_norm_out = torch.linalg.inv(_pixels_to_normalized(size, size, forward))
    theta = (to_norm_in @ crop_to_image @ from_norm_out)[:, :2, :]
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    out = F.grid_sample(images.to(work), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out.to(images.dtype)
