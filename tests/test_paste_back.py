"""paste_back.py: the cloak's change lands where the crop was cut, within the budget, nothing outside."""
from __future__ import annotations

import torch
from PIL import Image

from comfyui_iddm.paste_back import kept_share, paste_change
from comfyui_iddm.photos import CropBox, pil_to_tensor, tensor_to_pil


def test_a_crop_pixel_goes_back_to_the_photo_pixels_it_was_resized_from():
    """A 4x4 crop of a 40x40 square at (30, 20): crop pixel (row 1, col 2) covers photo pixels
    x 50..59, y 30..39, its centre at x 55, y 35 (Pillow's convention), between four photo pixels that
    each sit half a photo pixel (0.05 crop pixel) off it: bilinear gives them 0.95^2 of the change."""
    photo = torch.full((3, 80, 100), 0.5)
    change = torch.zeros(3, 4, 4)
    change[:, 1, 2] = 0.1
    pasted = paste_change(photo, change, CropBox(left=30, top=20, side=40))
    moved = (pasted - photo)[0]
    assert torch.allclose(moved[34:36, 54:56], torch.tensor(0.1 * 0.95 ** 2))
    assert moved.max() == moved[34, 54]
    assert moved[:20].abs().max() == 0 and moved[60:].abs().max() == 0
    assert moved[:, :30].abs().max() == 0 and moved[:, 70:].abs().max() == 0


def test_no_pixel_moves_more_than_the_budget_and_the_photo_stays_in_range():
    generator = torch.Generator().manual_seed(0)
    photo = torch.rand(3, 90, 130, generator=generator)
    eta = 0.03
    change = eta * torch.sign(torch.randn(3, 64, 64, generator=generator))
    for box in (CropBox(10.3, 5.7, 77.5), CropBox(0, 0, 90), CropBox(60, 20, 40)):  # bigger and smaller than 64
        pasted = paste_change(photo, change, box)
        assert (pasted - photo).abs().max() <= eta + 1e-6
        assert pasted.min() >= 0 and pasted.max() <= 1


def test_a_personalizations_crop_of_the_posted_photo_holds_the_cloak():
    generator = torch.Generator().manual_seed(1)
    photo = 0.2 + 0.6 * torch.rand(3, 120, 160, generator=generator)
    box = CropBox(20, 0, 120)
    square = (box.left, box.top, box.left + box.side, box.top + box.side)
    crop = pil_to_tensor(tensor_to_pil(photo).resize((64, 64), Image.Resampling.LANCZOS, box=square))
    cloaked = (crop + 0.025 * torch.sign(torch.randn(3, 64, 64, generator=generator))).clamp(0, 1)
    pasted = paste_change(photo, cloaked - crop, box)
    assert kept_share(pasted, box, crop, cloaked) > 0.8
    assert kept_share(photo, box, crop, cloaked) < 0.1  # the unprotected photo holds none of it
