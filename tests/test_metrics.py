"""Metrics against hand-computed values."""
import math
import warnings

import numpy as np
import pytest
import torch

from comfyui_iddm.faces.detect import FaceDetection
from comfyui_iddm.metrics import (evaluator_overlap, face_success_rate, identity_similarity, lpips_status,
                                  psnr, retrieval_topk, ssim)


def _face():
    return FaceDetection((0.0, 0.0, 10.0, 10.0), np.zeros((5, 2), np.float32), 0.99)


def test_psnr_by_hand():
    x = torch.zeros(1, 3, 8, 8)
    assert psnr(x, x + 0.1).item() == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 -> 10*log10(1/0.01)
    # per image, then averaged: MSE 0.01 (20 dB) and 0.0001 (40 dB) -> 30 dB
    batch = torch.stack([torch.full((3, 8, 8), 0.1), torch.full((3, 8, 8), 0.01)])
    assert psnr(batch, torch.zeros_like(batch)).item() == pytest.approx(30.0, abs=1e-4)
    assert psnr(batch, torch.zeros_like(batch), reduction="none").tolist() == pytest.approx([20.0, 40.0], abs=1e-4)
    assert math.isinf(psnr(x, x).item())


def test_ssim_by_hand_on_flat_images():
    # Flat images: variances and covariance are 0, so SSIM = (2 mx my + C1) / (mx^2 + my^2 + C1).
    x, y = torch.full((1, 3, 16, 16), 0.5), torch.full((1, 3, 16, 16), 0.3)
    c1 = 0.01 ** 2
    expected = (2 * 0.5 * 0.3 + c1) / (0.5 ** 2 + 0.3 ** 2 + c1)
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-6)
    torch.manual_seed(0)
    z = torch.rand(2, 3, 24, 24)
    assert ssim(z, z).item() == pytest.approx(1.0, abs=1e-6)
    assert ssim(z, 1 - z).item() < 0  # anti-correlated structure


def test_ssim_of_a_contrast_change_by_hand():
    # y = x scaled about its mean: luminance 1, contrast*structure = 2 s sx^2 / ((1 + s^2) sx^2 + C2)
    torch.manual_seed(1)
    x = 0.5 + 0.1 * torch.sign(torch.randn(1, 1, 11, 11))
    y = 0.5 + 0.5 * (x - 0.5)
    g = torch.exp(-(torch.arange(11) - 5.0) ** 2 / (2 * 1.5 ** 2))
    w = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    mx = (w * x[0, 0]).sum()
    vx = (w * (x[0, 0] - mx) ** 2).sum()
    my = 0.5 + 0.5 * (mx - 0.5)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1) * (2 * 0.5 * vx + c2) / (vx + 0.25 * vx + c2)
    assert ssim(x, y).item() == pytest.approx(expected.item(), abs=1e-5)


def test_ssim_matches_scikit_image_when_installed():
    metrics = pytest.importorskip("skimage.metrics")
    torch.manual_seed(2)
    x = torch.rand(1, 3, 40, 48)
    y = (x + 0.08 * torch.randn_like(x)).clamp(0, 1)
    reference = metrics.structural_similarity(x[0].numpy(), y[0].numpy(), data_range=1.0, channel_axis=0,
                                              gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(x, y).item() == pytest.approx(reference, abs=1e-4)


def test_quality_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_face_success_rate():
    assert face_success_rate([[_face()], [], [_face(), _face()], []]) == 0.5
    with pytest.raises(ValueError):
        face_success_rate([])


def test_retrieval_topk_by_hand():
    gallery = torch.eye(6)  # six identities
    queries = torch.tensor([[1.0, 0.0, 0, 0, 0, 0],   # identity 0: rank 0
                            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # true 3: rank 3
                            [0.0, 0.0, 0, 0, 0, 1.0]])  # true 2: rank 1 (ties with the 4 zeros)
    rates = retrieval_topk(queries, gallery, [0, 3, 2], ks=(1, 2, 5))
    assert rates == pytest.approx({1: 1 / 3, 2: 2 / 3, 5: 1.0})


def test_evaluator_overlap_warns_only_on_overlap():
    with pytest.warns(UserWarning, match="mobilefacenet"):
        assert evaluator_overlap(["mobilefacenet", "dlib_resnet"], ["mobilefacenet"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not evaluator_overlap(["dlib_resnet"], ["mobilefacenet"])


def test_identity_similarity_reports_per_image_and_mean():
    class FakeEnsemble:
        names = ("a", "b")
        prototypes = [torch.zeros(2)]

        def similarities(self, images, landmarks):
            v = images.mean()
            return torch.stack([v, 2 * v])[None]

    images = [torch.full((3, 4, 4), 0.2), torch.full((3, 5, 6), 0.9), torch.full((3, 4, 4), 0.4)]
    report = identity_similarity(FakeEnsemble(), images, [[_face()], [], [_face()]])
    assert report.fsr == pytest.approx(2 / 3)
    assert report.per_image[1] is None
    assert report.per_image[0] == pytest.approx([0.2, 0.4])
    assert report.mean == pytest.approx({"a": 0.3, "b": 0.6})


def test_lpips_says_why_it_is_unavailable():
    available, reason = lpips_status()
    assert isinstance(available, bool) and "LPIPS" in reason
