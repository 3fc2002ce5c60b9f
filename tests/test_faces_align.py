"""Alignment: landmarks land on the template (sub-pixel), and the warp is differentiable."""
import math

import pytest
import torch

from comfyui_iddm.faces.align import align_faces, similarity_transform
from comfyui_iddm.faces.templates import ARCFACE_112, FACENET_160, scaled_template


def _similar_landmarks(template, angle, scale, shift):
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) * scale
    return template @ rot.T + torch.tensor(shift)


def _apply(m, points):
    return points @ m[..., :2].transpose(-1, -2) + m[..., 2].unsqueeze(-2)


def test_similarity_transform_recovers_an_exact_similarity():
    lm = torch.stack([_similar_landmarks(ARCFACE_112, 0.3, 1.7, (40.3, 20.7)),
                      _similar_landmarks(ARCFACE_112, -0.5, 0.6, (5.0, 90.0))])
    m = similarity_transform(lm, ARCFACE_112)
    assert m.shape == (2, 2, 3)
    assert torch.allclose(_apply(m, lm), ARCFACE_112.expand(2, 5, 2), atol=1e-3)
    # rotation + uniform scale, no reflection or shear
    a, b = m[:, 0, 0], m[:, 1, 0]
    assert torch.allclose(m[:, 1, 1], a) and torch.allclose(m[:, 0, 1], -b)


def test_similarity_transform_is_the_least_squares_solution():
    torch.manual_seed(0)
    lm = (_similar_landmarks(ARCFACE_112, 0.1, 2.0, (10.0, 3.0)) + torch.randn(5, 2) * 3).double()
    m = similarity_transform(lm[None], ARCFACE_112.double())[0]
    # Solve dst = [[a,-b],[b,a]] src + t by ordinary least squares on (a, b, tx, ty).
    x, y = lm[:, 0], lm[:, 1]
    one, zero = torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    rows = torch.cat([torch.stack([x, -y, one, zero], 1), torch.stack([y, x, zero, one], 1)])
    target = torch.cat([ARCFACE_112[:, 0], ARCFACE_112[:, 1]]).double()
    a, b, tx, ty = torch.linalg.lstsq(rows, target[:, None]).solution.flatten()
    expected = torch.stack([torch.stack([a, -b, tx]), torch.stack([b, a, ty])])
    assert torch.allclose(m, expected, atol=1e-9)


def _blob_image(points, height, width, sigma=2.0):
    yy, xx = torch.meshgrid(torch.arange(height).double(), torch.arange(width).double(), indexing="ij")
    img = torch.zeros(1, 3, height, width, dtype=torch.float64)
    for p in points:
        img[0] += torch.exp(-((xx - p[0]) ** 2 + (yy - p[1]) ** 2) / (2 * sigma ** 2))
    return img


def _centroids(image, template, radius=6.0):
    size = image.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(size).double(), torch.arange(size).double(), indexing="ij")
    found = []
    for t in template.double():
        w = image[0, 0] * ((xx - t[0]) ** 2 + (yy - t[1]) ** 2 < radius ** 2)
        found.append(torch.stack([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()]))
    return torch.stack(found)


@pytest.mark.parametrize("template,size", [(ARCFACE_112, 112), (FACENET_160, 160)])
def test_landmarks_land_on_the_template_subpixel(template, size):
    # A non-square photo with a rotated, scaled face at a sub-pixel position.
    lm = _similar_landmarks(ARCFACE_112, 0.25, 1.6, (37.37, 12.61))
    photo = _blob_image(lm, 230, 260, sigma=2.5)
    crop = align_faces(photo, lm[None].double(), template, size)
    assert crop.shape == (1, 3, size, size)
    error = (_centroids(crop, template) - template.double()).norm(dim=1)
    assert error.max() < 0.05, error  # pixels


def test_identity_alignment_reproduces_the_crop():
    # Landmarks already on the template of a same-size image: the warp is the identity.
    torch.manual_seed(1)
    img = torch.rand(1, 3, 112, 112, dtype=torch.float64)
    out = align_faces(img, ARCFACE_112[None].double(), ARCFACE_112, 112)
    assert torch.allclose(out, img, atol=1e-6)


def test_scaled_template_keeps_pixel_centres():
    assert torch.allclose(scaled_template(torch.tensor([[-0.5, 55.5]]), 112, 224), torch.tensor([[-0.5, 111.5]]))


def test_alignment_is_differentiable_gradcheck():
    torch.manual_seed(0)
    small = ARCFACE_112 / 112 * 10
    lm = _similar_landmarks(small, 0.2, 0.9, (2.3, 1.7))[None].double()
    img = torch.rand(1, 2, 12, 14, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: align_faces(x, lm, small, 10), (img,), eps=1e-6, atol=1e-5)


def test_gradient_reaches_the_face_pixels_only():
    lm = _similar_landmarks(ARCFACE_112, 0.0, 0.5, (20.0, 20.0))[None]
    img = torch.rand(1, 3, 120, 120, requires_grad=True)
    align_faces(img, lm, ARCFACE_112, 112).sum().backward()
    grad = img.grad.abs().sum(1)[0]
    assert grad[20:70, 20:70].sum() > 0  # the face region (template scaled by 0.5)
    assert grad[90:, 90:].sum() == 0  # far away from the face


def test_bad_inputs_are_rejected_clearly():
    with pytest.raises(ValueError, match="landmarks"):
        align_faces(torch.rand(2, 3, 50, 50), torch.rand(1, 5, 2), ARCFACE_112, 112)
    with pytest.raises(ValueError, match="one point"):
        similarity_transform(torch.ones(1, 5, 2), ARCFACE_112)
