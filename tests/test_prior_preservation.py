"""DreamBooth prior preservation end to end (issue 12): class images from a folder or generated once
into it with the model itself (a DDIM sampler on the Denoiser port), refusals before any training,
and reports/metadata that record a count, never the folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from comfyui_iddm.backends import diffusers_backend
from comfyui_iddm.backends.diffusers_backend import load_denoiser
from comfyui_iddm.backends.tiny import tiny_scheduler
from comfyui_iddm.class_images import NODE_HINTS, check_prior_preservation, fit_class_images
from comfyui_iddm.config import ConfigError
from comfyui_iddm.diffusion import NoiseSchedule
from comfyui_iddm.pipeline import train_on_photos
from comfyui_iddm.sampling import generate_images, sample_latents

from conftest import (centred_set, files_under, run_cli_here, synthetic_photos, tiny_config, train_argv,
                      write_photos)


# --- the sampler -----------------------------------------------------------------------------------
class OracleDenoiser:
    """Knows the clean latent: outputs exactly the epsilon (or v) that z_t implies for it. A correct
    DDIM loop must then land on that latent from any noise."""

    def __init__(self, z0: torch.Tensor, prediction_type: str) -> None:
        self.z0, self.device = z0, torch.device("cpu")
        self.schedule = NoiseSchedule(tiny_scheduler().alphas_cumprod.float(), prediction_type)

    def predict(self, z_t, t, cond):
        a, s = self.schedule.coefficients(t, z_t)
        z0 = self.z0.expand_as(z_t)
        noise = (z_t - a * z0) / s
        return noise if self.schedule.prediction_type == "epsilon" else a * noise - s * z0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_lands_on_the_clean_latent_the_model_predicts(prediction_type):
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    oracle = OracleDenoiser(z0, prediction_type)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = torch.zeros(1, 2, 3)
    for steps in (1, 4, 25):
        out = sample_latents(oracle, noise, cond, uncond=cond, steps=steps, guidance=3.0)
        assert torch.allclose(out, z0.expand_as(out), atol=1e-4), steps


@pytest.fixture(scope="module")
def tiny():
    return load_denoiser("tiny", tiny_config())


def test_generation_on_tiny_is_fast_and_deterministic_per_seed_and_index(tiny):
    images = generate_images(tiny, "a photo of person", [0, 1, 2], 64, seed=5, steps=4)
    assert images.shape == (3, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, generate_images(tiny, "a photo of person", [0, 1, 2], 64, seed=5, steps=4))
    alone = generate_images(tiny, "a photo of person", [2], 64, seed=5, steps=4)
    assert torch.allclose(alone[0], images[2], atol=1e-4)  # image i does not depend on its batch
    assert not torch.allclose(images[0], images[1], atol=1e-2)
    other_seed = generate_images(tiny, "a photo of person", [0], 64, seed=6, steps=4)
    assert not torch.allclose(other_seed[0], images[0], atol=1e-2)


# --- the refusals ----------------------------------------------------------------------------------
def test_a_weight_without_class_images_and_class_images_without_weight_are_refused():
    with pytest.raises(ConfigError, match="no class images"):
        check_prior_preservation(1.0, False)
    with pytest.raises(ConfigError, match="prior_weight is 0"):
        check_prior_preservation(0.0, True)
    check_prior_preservation(0.0, False)
    check_prior_preservation(0.5, True)
    with pytest.raises(ConfigError, match="disconnect class_images"):  # the node says what to do there
        check_prior_preservation(0.0, True, NODE_HINTS)


@pytest.mark.parametrize("extra, message", [
    (["--prior-weight", "1"], "--class-dir DIR"),
    (["--class-dir", "{classes}"], "--prior-weight above 0"),
    (["--num-class-images", "3", "--prior-weight", "1"], "--num-class-images needs --class-dir"),
    (["--class-dir", "{empty}", "--prior-weight", "1"], "holds no images"),
    (["--class-dir", "{missing}", "--prior-weight", "1"], "--num-class-images N to generate"),
    (["--class-dir", "{classes}", "--num-class-images", "0", "--prior-weight", "1"], "not a positive count"),
])
def test_the_cli_refuses_prior_preservation_it_could_not_honour_before_any_training(
        place, tmp_path, monkeypatch, extra, message):
    write_photos(tmp_path / "classes", 2, size=64)
    (tmp_path / "empty").mkdir()
    folders = {"classes": tmp_path / "classes", "empty": tmp_path / "empty", "missing": tmp_path / "missing"}
    monkeypatch.setattr(diffusers_backend, "load_denoiser", lambda *a, **k: pytest.fail("training started"))
    code, _, err = run_cli_here(train_argv(place.photos, place.lora, *[e.format(**folders) for e in extra]))
    assert code == 2 and message in err, err
    assert files_under(place.out) == set()


# --- end to end ------------------------------------------------------------------------------------
def test_class_images_are_generated_once_used_and_recorded_as_a_count_only(place, tmp_path):
    classes = tmp_path / "class_pictures"
    report = place.out / "report.json"
    argv = train_argv(place.photos, place.lora, "--class-dir", classes, "--num-class-images", "3",
                      "--prior-weight", "1", "--class-prompt", "a photo of a person", "--report", report)
    code, _, err = run_cli_here(argv)
    assert code == 0, err
    generated = sorted(p.name for p in classes.iterdir())
    assert generated == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert all(Image.open(classes / name).size == (64, 64) for name in generated)
    data = json.loads(report.read_text())
    assert data["photos"]["class"] == 3 and data["config"]["prior_weight"] == 1.0
    with safe_open(str(place.lora), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["iddm.figures"])["class_images"] == 3
    for text in (report.read_text(), json.dumps(metadata)):
        assert "class_pictures" not in text and "class_0000" not in text and str(tmp_path) not in text

    # The next run reuses them; asking for more generates only the missing ones, and those are the
    # images one run asking for all of them at once makes (image i comes from seed (seed, i)).
    stamps = {p.name: p.stat().st_mtime_ns for p in classes.iterdir()}
    code, _, err = run_cli_here(argv[:argv.index("3")] + ["4"] + argv[argv.index("3") + 1:] + ["--overwrite"])
    assert code == 0, err
    assert {p.name: p.stat().st_mtime_ns for p in classes.iterdir() if p.name in stamps} == stamps
    assert sorted(p.name for p in classes.iterdir()) == generated + ["class_00003.png"]
    fresh = tmp_path / "fresh"
    code, _, err = run_cli_here(train_argv(place.photos, tmp_path / "other.safetensors", "--class-dir", fresh,
                                           "--num-class-images", "4", "--prior-weight", "1",
                                           "--class-prompt", "a photo of a person"))
    assert code == 0, err
    for name in generated + ["class_00003.png"]:
        a = np.asarray(Image.open(classes / name), dtype=np.int16)
        b = np.asarray(Image.open(fresh / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name


def test_a_folder_of_class_images_is_used_as_it_is(place, tmp_path):
    classes = tmp_path / "classes"
    write_photos(classes, 3, size=80)
    before = files_under(classes)
    code, _, err = run_cli_here(train_argv(place.photos, place.lora, "--class-dir", classes,
                                           "--prior-weight", "0.5", "--report", place.out / "r.json"))
    assert code == 0, err
    assert files_under(classes) == before  # nothing generated, nothing written there
    assert json.loads((place.out / "r.json").read_text())["photos"]["class"] == 3


def test_prior_preservation_changes_what_the_lora_learns_and_takes_any_image_size(test_recognizer):
    """The node hands over class images at whatever size they were made: they are centre-cropped and
    resized to the training resolution, and with a weight they change the fine-tune."""
    photos = synthetic_photos(4, 64, seed=3)
    reference, protection = centred_set(photos[:2]), centred_set(photos[2:])
    plain = train_on_photos(load_denoiser("tiny", tiny_config()), reference, protection, tiny_config())
    classes = torch.rand(3, 3, 72, 96, generator=torch.Generator().manual_seed(0))
    config = tiny_config(prior_weight=1.0)
    prior = train_on_photos(load_denoiser("tiny", config), reference, protection, config, class_images=classes)
    assert prior.report["photos"]["class"] == 3 and "class" not in plain.report["photos"]
    changed = [k for k in plain.lora if not torch.equal(plain.lora[k], prior.lora[k])]
    assert changed, "prior preservation did not change the LoRA"
    assert fit_class_images(classes, 64).shape == (3, 3, 64, 64)
    with pytest.raises(ConfigError, match="prior_weight is 0"):  # the engine refuses too, for any door
        train_on_photos(load_denoiser("tiny", tiny_config()), reference, protection, tiny_config(),
                        class_images=classes)


def test_the_sweep_generates_class_images_once_and_uses_them_for_every_rho(tmp_path, test_recognizer):
    from comfyui_iddm.class_images import ClassImagePlan
    from comfyui_iddm.sweep import run_sweep

    photos = synthetic_photos(4, 64, seed=5)
    config = tiny_config(prior_weight=1.0, ft_steps=1, pgd_steps=2)
    plan = ClassImagePlan.check(tmp_path / "classes", 2, config)
    sweep = run_sweep([0.5, 1.0], tmp_path / "sweep", config, centred_set(photos[:2]), centred_set(photos[2:]),
                      class_plan=plan, log=lambda message: None)
    assert sorted(p.name for p in (tmp_path / "classes").iterdir()) == ["class_00000.png", "class_00001.png"]
    assert sweep["photos"]["class"] == 2 and sweep["config"]["recognizers"] == ["tiny_test"]
    assert "classes" not in (tmp_path / "sweep" / "sweep.json").read_text()
