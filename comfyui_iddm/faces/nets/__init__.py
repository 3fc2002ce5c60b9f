"""Face-recognizer networks. Each builder returns a `Recognizer`: aligned RGB faces in [0,1] in,
unit-length embeddings out, with the network's own input normalization applied inside."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Recognizer(nn.Module):
    """Wraps a backbone with its input convention. Attributes: name, input_size, template."""

    def __init__(self, backbone: nn.Module, name: str, input_size: int, template: Tensor,
                 mean: Sequence[float], std: Sequence[float], bgr: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.input_size = input_size
        self.bgr = bgr
        self.register_buffer("template", template.clone().float(), persistent=False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def forward(self, aligned: Tensor) -> Tensor:
        if aligned.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"{self.name} takes {self.input_size}x{self.input_size} aligned faces; "
                             f"got {tuple(aligned.shape[-2:])}.")
        x = aligned.flip(1) if self.bgr else aligned
        x = (x - self.mean) / self.std
        return F.normalize(self.backbone(x).flatten(1), dim=1)

    def train(self, mode: bool = True) -> "Recognizer":
        # A recognizer is a fixed function: batch-norm statistics and dropout never switch to training.
        return super().train(False)


# Input normalizations, per the training code of each published network.
SYMMETRIC = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # x in [-1, 1]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
