"""The identity score of IDDM (paper eq. 10-12), the one home of these equations.

For recognizers f_1..f_M and reference photos x_i of the person:
    e_m = normalize(mean_i f_m(Align(x_i)))         identity prototype (once, no gradient)
    s_m = cos(f_m(Align(x)), e_m)                     per-recognizer similarity
    w   = softmax(s / tau) over m                     the recognizer that still "sees" the person
    S   = sum_m w_m s_m                               weighs most (Stage II loss: L_id = 1 + S)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .align import align_faces


@dataclass
class EnsembleScore:
    total: Tensor  # [B] S
    per_recognizer: Tensor  # [B, M] s_m


def embed_faces(recognizer: nn.Module, images: Tensor, landmarks: Tensor) -> Tensor:
    """Unit embeddings [B, D] of the faces at `landmarks` (differentiable w.r.t. images)."""
    template = recognizer.template.to(images.device)
    aligned = align_faces(images, landmarks.to(images.device), template, recognizer.input_size)
    return recognizer(aligned)


@torch.no_grad()
def identity_prototype(recognizer: nn.Module, images: Tensor | Sequence[Tensor],
                       landmarks: Tensor | Sequence[Tensor]) -> Tensor:
    """e = normalize(mean_i f(Align(x_i))): one unit vector [D] for the person in `images`.

    images: a batch [N,3,H,W] with landmarks [N,5,2], or (photos of different sizes) a sequence
    of [3,H,W] images with a sequence of [5,2] landmarks.
    """
    if isinstance(images, Tensor):
        embeddings = embed_faces(recognizer, images, landmarks)
    else:
        embeddings = torch.cat([embed_faces(recognizer, img[None], torch.as_tensor(lm)[None])
                                for img, lm in zip(images, landmarks, strict=True)])
    return F.normalize(embeddings.mean(dim=0), dim=0)


class IdentityEnsemble(nn.Module):
    """Implements ports.IdentityScorer for one identity and a fixed set of recognizers."""

    def __init__(self, recognizers: Sequence[nn.Module], prototypes: Sequence[Tensor], tau: float) -> None:
        super().__init__()
        if not recognizers or len(recognizers) != len(prototypes):
            raise ValueError("IdentityEnsemble needs at least one recognizer and one prototype each.")
        if tau <= 0:
            raise ValueError(f"tau={tau} must be > 0 (softmax temperature over the recognizers).")
        self.recognizers = nn.ModuleList(recognizers)
        self.names = tuple(r.name for r in recognizers)
        self.tau = float(tau)
        self.prototypes = [p.detach() for p in prototypes]

    @classmethod
    def from_reference(cls, recognizers: Sequence[nn.Module], reference_images: Tensor | Sequence[Tensor],
                       reference_landmarks: Tensor | Sequence[Tensor], tau: float) -> "IdentityEnsemble":
        prototypes = [identity_prototype(r, reference_images, reference_landmarks) for r in recognizers]
        return cls(recognizers, prototypes, tau)

    def similarities(self, images: Tensor, landmarks: Tensor) -> Tensor:
        """[B, M] cosine of each face to each recognizer's prototype (differentiable)."""
        return torch.stack([embed_faces(r, images, landmarks) @ p.to(images.device)
                            for r, p in zip(self.recognizers, self.prototypes)], dim=1)

    def score(self, images: Tensor, landmarks: Tensor) -> EnsembleScore:
        s = self.similarities(images, landmarks)
        w = torch.softmax(s / self.tau, dim=1)
        return EnsembleScore(total=(w * s).sum(dim=1), per_recognizer=s)

    def forward(self, images: Tensor, landmarks: Tensor) -> EnsembleScore:
        return self.score(images, landmarks)
