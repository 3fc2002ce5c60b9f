"""Canonical 5-point face templates (left eye, right eye, nose tip, left mouth corner, right mouth
corner; "left" = image left), in pixels of the recognizer's square input, pixel centres at integer
coordinates (the OpenCV convention the published templates were made with)."""
from __future__ import annotations

import torch
from torch import Tensor

# The standard ArcFace template for 112x112 crops (InsightFace's `arcface_dst`); IR/IR-SE,
# MobileFaceNet and ArcFace were all trained on faces aligned to it.
ARCFACE_112 = torch.tensor([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
])


def scaled_template(template: Tensor, from_size: int, to_size: int) -> Tensor:
    """The same face placement in a crop of another size (pixel centres stay at integers)."""
    scale = to_size / from_size
    return (template + 0.5) * scale - 0.5


# FaceNet (InceptionResnetV1) takes 160x160 crops; the face-privacy literature feeds it the
# ArcFace-aligned face resized to 160, i.e. the same template scaled.
FACENET_160 = scaled_template(ARCFACE_112, 112, 160)
