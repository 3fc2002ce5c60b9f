"""Identity Similarity over many generated images streams: the detector sees bounded batches and
each face is embedded on its own, so memory beyond the inputs does not grow with their number."""
from __future__ import annotations

import numpy as np
import torch

from comfyui_iddm.faces.detect import FaceDetection
from comfyui_iddm.metrics import DETECT_BATCH, similarity_to_reference
from comfyui_iddm.photos import centred_face

from conftest import synthetic_photos


class CountingDetector:
    """A centred face in every image except blank ones; records each call's batch size."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def detect(self, images):
        self.batches.append(images.shape[0])
        side = images.shape[-1]
        face = centred_face((side, side))
        return [[] if float(img.std()) == 0 else [FaceDetection(face.box, face.landmarks, 0.99)]
                for img in images]


class CountingRecognizer(torch.nn.Module):
    def __init__(self, inner) -> None:
        super().__init__()
        self.inner, self.calls = inner, []
        self.name, self.input_size, self.template = inner.name, inner.input_size, inner.template

    def forward(self, aligned):
        self.calls.append(aligned.shape[0])
        return self.inner(aligned)


def test_many_images_are_detected_in_batches_and_embedded_one_at_a_time(tiny_recognizer):
    generated = synthetic_photos(70, size=64, seed=1)
    generated[5] = 0.5  # a blank image: no face
    reference = synthetic_photos(3, size=64, seed=2)
    detector, recognizer = CountingDetector(), CountingRecognizer(tiny_recognizer)
    result = similarity_to_reference(recognizer, detector, generated, reference)

    assert max(detector.batches[1:]) <= DETECT_BATCH and sum(detector.batches[1:]) == 70
    assert recognizer.calls[0] == 3 and set(recognizer.calls[1:]) == {1} and len(recognizer.calls) == 1 + 69
    assert result["per_image"][5] is None and result["fsr"] == 69 / 70
    expected = np.mean([s for s in result["per_image"] if s is not None])
    assert abs(result["mean_similarity"] - expected) < 1e-3
