"""The budget's pixel scale and the fidelity options: face_mask, target_similarity, step_decay."""
from __future__ import annotations

import pytest
import torch

from comfyui_iddm import iddm
from comfyui_iddm.backends.diffusers_backend import load_denoiser
from comfyui_iddm.config import IDDMConfig
from comfyui_iddm.faces.ensemble import IdentityEnsemble
from comfyui_iddm.faces.region import face_region
from comfyui_iddm.iddm import photo_budget, run_iddm
from conftest import TinyRecognizer, synthetic_photos, tiny_config

PHOTOS = synthetic_photos(4, 64, seed=1)
REFERENCE, PROTECTION = PHOTOS[:2], PHOTOS[2:]
LANDMARKS = torch.tensor([[[26.0, 28.0], [38.0, 28.0], [32.0, 35.0], [27.0, 42.0], [37.0, 42.0]]]).repeat(2, 1, 1)


def run(config):
    denoiser = load_denoiser("tiny", config)
    scorer = IdentityEnsemble.from_reference([TinyRecognizer()], REFERENCE, LANDMARKS, config.tau)
    return run_iddm(denoiser, REFERENCE, PROTECTION, LANDMARKS, scorer, config)


def test_eta_and_alpha_are_in_the_papers_minus1_1_scale_and_old_settings_keep_theirs():
    config = IDDMConfig()
    assert config.pixel_range == "-1,1" and config.budget == pytest.approx((0.04, 0.004))
    assert IDDMConfig(pixel_range="0,1").budget == pytest.approx((0.08, 0.008))
    legacy = {k: v for k, v in config.to_dict().items() if k != "pixel_range"}  # saved before the scale
    assert IDDMConfig.from_dict(legacy).pixel_range == "0,1"


def test_the_face_region_is_the_aligned_square_the_recognizers_see():
    region = face_region(LANDMARKS, 64, 64)
    assert region.shape == (2, 1, 64, 64)
    assert float(region[0, 0, 32, 32]) == 1.0  # the nose
    assert float(region[0, 0, 0, 0]) == 0.0 and float(region[0, 0, 63, 63]) == 0.0  # the corners
    assert 0.1 < float(region.mean()) < 0.6


def test_with_face_mask_no_background_pixel_changes():
    config = tiny_config(face_mask=True, iterations=2)
    result = run(config)
    changed = (result.decoupled - PROTECTION).abs().amax(dim=1, keepdim=True) > 0
    outside = face_region(LANDMARKS, 64, 64) == 0
    assert changed.any() and not (changed & outside).any()


def test_a_photo_at_the_target_similarity_is_not_pushed_further(monkeypatch):
    # rho 0: Stage II only. A target every photo already meets: nothing moves; -1 (off): they move.
    assert torch.equal(run(tiny_config(rho=0.0, target_similarity=1.0)).decoupled, PROTECTION)
    assert not torch.equal(run(tiny_config(rho=0.0, target_similarity=-1.0)).decoupled, PROTECTION)


def test_step_decay_shrinks_alpha_over_the_iterations():
    config = tiny_config(step_decay=True, iterations=4, face_mask=False)
    alphas = [photo_budget(config, LANDMARKS, (64, 64), k)[1] for k in range(1, 5)]
    assert alphas[0] == pytest.approx(config.budget[1]) and alphas == sorted(alphas, reverse=True)
    assert alphas[-1] > 0
    plain = tiny_config(face_mask=False)
    assert photo_budget(plain, LANDMARKS, (64, 64), 4)[1] == pytest.approx(plain.budget[1])


def test_the_cli_turns_boolean_knobs_on_and_off_and_its_help_renders():
    from comfyui_iddm.cli import build_parser, config_from_args
    from conftest import run_cli_here

    parser = build_parser()
    base = ["train", "photos", "--base", "tiny", "--out", "x.safetensors"]
    assert config_from_args(parser.parse_args(base)).face_mask is True
    assert config_from_args(parser.parse_args(base + ["--no-face-mask"])).face_mask is False
    assert config_from_args(parser.parse_args(base + ["--step-decay", "--pixel-range", "0,1"])).budget == (0.08, 0.008)
    code, out, _ = run_cli_here(["train", "--help"])
    assert code == 0 and "--no-face-mask" in out and "[-1,1]" in out
