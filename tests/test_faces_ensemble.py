"""The identity score (paper eq. 10-12) against a hand computation, with tiny recognizers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comfyui_iddm.faces.align import align_faces
from comfyui_iddm.faces.ensemble import IdentityEnsemble, identity_prototype
from comfyui_iddm.faces.nets import Recognizer
from comfyui_iddm.faces.templates import ARCFACE_112, scaled_template

SIZE = 16
TEMPLATE = scaled_template(ARCFACE_112, 112, SIZE)


def tiny_recognizer(name: str, seed: int, dim: int = 8) -> Recognizer:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, dim))
    return Recognizer(net, name, SIZE, TEMPLATE, (0.5,) * 3, (0.5,) * 3)


def faces(n: int, seed: int):
    torch.manual_seed(seed)
    images = torch.rand(n, 3, 40, 48)
    landmarks = (ARCFACE_112 / 112 * 30 + torch.tensor([8.0, 4.0])).expand(n, 5, 2).clone()
    landmarks += torch.randn(n, 5, 2) * 0.5
    return images, landmarks


def test_prototype_is_the_normalized_mean_embedding():
    rec = tiny_recognizer("a", 0)
    images, landmarks = faces(3, 1)
    expected = F.normalize(rec(align_faces(images, landmarks, TEMPLATE, SIZE)).mean(0), dim=0)
    proto = identity_prototype(rec, images, landmarks)
    assert torch.allclose(proto, expected, atol=1e-6) and not proto.requires_grad
    # photos of different sizes, given one by one, give the same prototype
    listed = identity_prototype(rec, list(images), list(landmarks))
    assert torch.allclose(listed, expected, atol=1e-6)


def test_score_matches_eq_10_to_12_by_hand():
    recs = [tiny_recognizer("a", 0), tiny_recognizer("b", 1, dim=5)]
    ref_images, ref_landmarks = faces(4, 2)
    tau = 0.03
    ensemble = IdentityEnsemble.from_reference(recs, ref_images, ref_landmarks, tau)
    assert ensemble.names == ("a", "b")
    images, landmarks = faces(2, 3)
    result = ensemble.score(images, landmarks)

    s = torch.zeros(2, 2)
    for m, rec in enumerate(recs):
        e = F.normalize(rec(align_faces(ref_images, ref_landmarks, TEMPLATE, SIZE)).mean(0), dim=0)
        f = rec(align_faces(images, landmarks, TEMPLATE, SIZE))
        s[:, m] = (f * e).sum(1) / f.norm(dim=1) / e.norm()  # cosine
    w = torch.exp(s / tau) / torch.exp(s / tau).sum(1, keepdim=True)
    assert torch.allclose(result.per_recognizer, s, atol=1e-5)
    assert torch.allclose(result.total, (w * s).sum(1), atol=1e-5)
    # small tau: S is close to the largest s_m (the recognizer that still recognises the person)
    assert ((result.total - s.max(1).values).abs() <= (s.max(1).values - s.min(1).values) + 1e-6).all()


def test_reference_faces_score_high_and_gradients_reach_the_pixels():
    recs = [tiny_recognizer("a", 0)]
    ref_images, ref_landmarks = faces(1, 4)
    ensemble = IdentityEnsemble.from_reference(recs, ref_images, ref_landmarks, tau=0.5)
    x = ref_images.clone().requires_grad_(True)
    score = ensemble.score(x, ref_landmarks)
    assert torch.allclose(score.total, torch.ones(1), atol=1e-5)  # the prototype of one photo is itself
    (1 + score.total).sum().backward()  # L_id
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("count,tau", [(0, 1.0), (1, 0.0)])
def test_bad_arguments_are_rejected(count, tau):
    recs = [tiny_recognizer("a", 0)][:count]
    with pytest.raises(ValueError):
        IdentityEnsemble(recs, [torch.ones(8)] * count, tau)
