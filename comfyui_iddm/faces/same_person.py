"""When do two faces show the same person? Each recognizer's verification threshold, and the checks
built on it: the verdict of `iddm similarity` and the warning when a photo set seems to hold more
than one person.

A threshold is a cosine between unit embeddings (what every recognizer here outputs): at or above
it, the recognizer takes the two faces for the same person. Each value says where it comes from;
a recognizer with no known threshold gets no verdict (never a guessed one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamePersonThreshold:
    cosine: float  # same person at or above this cosine of unit embeddings
    source: str  # where the value comes from (shown with the figures)


_PAPERS = ("the face-privacy papers' threshold at a false-accept rate of 1% for the same weights "
           "(AMT-GAN, CLIP2Protect, DiffAM: th_dict '{}' FAR 0.01)")

# (name, embedding size) first, then name alone.
THRESHOLDS: dict[str | tuple[str, int], SamePersonThreshold] = {
    "dlib_resnet": SamePersonThreshold(0.93, (
        "DeepFace's threshold for dlib's recognizer on unit vectors (cosine distance 0.07); dlib's own "
        "rule, Euclidean distance < 0.6 between its raw descriptors (about 1.5 long: 1.36-1.59 measured "
        "with dlib itself on insightface's t1.jpg), gives 1 - 0.6^2 / (2 * 1.5^2) = 0.92; with this "
        "pack's alignment two of t1.jpg's six different people reached 0.927")),
    ("mobilefacenet", 128): SamePersonThreshold(0.336, (
        "foamliu/MobileFaceNet's LFW threshold, 70.36 degrees between embeddings (lfw_eval.py): "
        "cos 70.36 = 0.336")),
    ("mobilefacenet", 512): SamePersonThreshold(0.302, _PAPERS.format("mobile_face")),
    "irse50": SamePersonThreshold(0.241, _PAPERS.format("irse50")),
    "ir152": SamePersonThreshold(0.167, _PAPERS.format("ir152")),
    "facenet": SamePersonThreshold(0.409, _PAPERS.format("facenet")),
    "arcface": SamePersonThreshold(0.45, (
        "DeepFace's threshold for InsightFace's buffalo_l recognizer (cosine distance 0.55); "
        "antelopev2's glintr100 is trained the same way")),
}


def threshold_for(name: str, dim: int | None = None) -> SamePersonThreshold | None:
    """The same-person threshold of recognizer `name` (embedding size `dim` where it matters)."""
    return THRESHOLDS.get((name, dim)) or THRESHOLDS.get(name)


def verdict(cosine: float, threshold: SamePersonThreshold | None) -> str | None:
    """'same person' / 'different person' (None without a known threshold)."""
    if threshold is None:
        return None
    return "same person" if cosine >= threshold.cosine else "different person"


def same_person_groups(embeddings: Tensor, threshold: float) -> list[list[int]]:
    """Photos linked (directly or through others) by a same-person cosine, largest group first.

    One link is enough to join a group, so a single poor photo of the person does not split it."""
    n = embeddings.shape[0]
    linked = (embeddings @ embeddings.T) >= threshold
    group = list(range(n))

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if linked[i, j]:
                group[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


@torch.no_grad()
def mixed_identity_warnings(recognizers: Sequence[torch.nn.Module], images: Tensor, landmarks: Tensor,
                            labels: Sequence[str]) -> list[str]:
    """A warning for each way the photos split into more than one same-person group under the
    recognizers with a known threshold (recognizers that agree share one warning), naming the
    photos by `labels` (numbers, never file names)."""
    from .ensemble import embed_faces

    if images.shape[0] < 2:
        return []
    splits: dict[tuple, list[str]] = {}  # grouping -> "name: cosine ..., same person from ..."
    for recognizer in recognizers:
        device = next(recognizer.parameters(), images).device
        embeddings = torch.cat([embed_faces(recognizer, images[i:i + 1].to(device), landmarks[i:i + 1].to(device))
                                for i in range(images.shape[0])]).float()
        threshold = threshold_for(recognizer.name, embeddings.shape[1])
        if threshold is None:
            continue
        groups = same_person_groups(embeddings, threshold.cosine)
        if len(groups) < 2:
            continue
        main, others = groups[0], [i for g in groups[1:] for i in g]
        worst = float((embeddings[others] @ embeddings[main].T).max())
        splits.setdefault(tuple(map(tuple, groups)), []).append(
            f"{recognizer.name}: cosine across at most {worst:.2f}, same person from {threshold.cosine:.2f}")
    warnings = []
    for grouping, figures in splits.items():
        groups = [list(g) for g in grouping]
        if len(groups[0]) == len(groups[1]):
            what = (f"the photos may show {len(groups)} different people: "
                    + "; ".join(_join(labels, g) for g in groups))
        else:
            what = (f"{_join(labels, [i for g in groups[1:] for i in g])} may show someone else than "
                    f"{_join(labels, groups[0])}")
        warnings.append(f"{what} ({'; '.join(figures)}). Train on photos of one person only: remove any "
                        "photo of someone else.")
    return warnings


def _join(labels: Sequence[str], indices: Sequence[int]) -> str:
    """'photo 3' / 'photos 1, 2 and 4' from labels like 'photo 3'."""
    names = [labels[i] for i in indices]
    if len(names) == 1:
        return names[0]
    prefix = "photo "
    if all(n.startswith(prefix) for n in names):
        numbers = [n[len(prefix):] for n in names]
        return "photos " + ", ".join(numbers[:-1]) + " and " + numbers[-1]
    return ", ".join(names[:-1]) + " and " + names[-1]


def one_person_warnings(recognizers: Sequence[torch.nn.Module], *photo_sets) -> list[str]:
    """mixed_identity_warnings over PhotoSets (e.g. the reference and protection sets together),
    photos named by their number in the folder, or by set and position when numbers are unknown."""
    labels: list[str] = []
    for which, photos in zip(("reference", "protection"), photo_sets):
        labels += ([f"photo {n}" for n in photos.numbers] if len(photos.numbers) == len(photos)
                   else [f"{which} photo {i + 1}" for i in range(len(photos))])
    images = torch.cat([p.images for p in photo_sets])
    landmarks = torch.cat([p.landmarks for p in photo_sets])
    return mixed_identity_warnings(recognizers, images, landmarks, labels)
