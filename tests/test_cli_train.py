"""`iddm train` end to end on the tiny model: the outputs and the report keep issue 2's contract."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from comfyui_iddm.config import IDDMConfig
from comfyui_iddm.lora_io import read_iddm_settings

from conftest import files_under, register_test_recognizer, run_cli_here, train_argv, write_photos


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli")
    undo = register_test_recognizer()
    photos = tmp_path / "photos"
    write_photos(photos, 5)
    (photos / "notes.txt").write_text("not a photo")
    out = tmp_path / "out"
    out.mkdir()
    argv = train_argv(photos, out / "person.safetensors", "--reference", "2", "--eta", "0.05", "--seed", "7",
                      "--report", out / "report.json", "--decoupled-out", out / "decoupled")
    code, stdout, stderr = run_cli_here(argv)
    undo()
    return code, stdout, stderr, out, tmp_path


def test_train_writes_lora_decoupled_photos_and_report_and_nothing_else(finished_run):
    code, stdout, stderr, out, _ = finished_run
    assert code == 0, stderr
    assert files_under(out) == {"person.safetensors", "report.json", "decoupled",
                                "decoupled/decoupled_000.png", "decoupled/decoupled_001.png",
                                "decoupled/decoupled_002.png"}  # the state folder is gone
    assert "LoRA written" in stdout
    assert "notes.txt: not an image file (skipped)" in stderr  # told, not fatal


def test_lora_is_kohya_with_every_knob_in_the_metadata(finished_run):
    out = finished_run[3]
    with safe_open(str(out / "person.safetensors"), framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                        for k in keys)
    assert any("attn2_to_k" in k for k in keys)
    settings = read_iddm_settings(metadata)
    expected = IDDMConfig(resolution=64, iterations=2, ft_steps=2, pgd_steps=4, rho=0.5, eta=0.05, seed=7,
                          recognizers="tiny_test").to_dict()
    assert {k: settings[k] for k in expected} == expected
    assert metadata["ss_network_dim"] == "4"
    assert settings["figures"]["identity"]["surrogate"]["tiny_test"]["after"] < \
        settings["figures"]["identity"]["surrogate"]["tiny_test"]["before"]


def test_report_has_the_contracted_fields(finished_run):
    out = finished_run[3]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["eta"] == 0.05 and report["config"]["pgd_steps"] == 4
    assert report["photos"] == {"reference": 2, "protection": 3}
    assert len(report["iterations"]) == 2
    for record in report["iterations"]:
        assert len(record["stage1_loss"]) == 2 and len(record["stage2_score"]) == 2
        assert len(record["ft_loss"]) == 4 and record["seconds"] > 0
    assert 0 < report["decoupled"]["linf"] <= 0.05 + 1e-4
    assert report["decoupled"]["psnr"] > 20 and 0 < report["decoupled"]["ssim"] <= 1
    assert report["seconds_total"] > 0


def test_decoupled_photos_are_the_protection_set_within_eta(finished_run):
    out, tmp_path = finished_run[3:]
    originals = sorted((tmp_path / "photos").glob("*.png"))[2:]  # order split: the last 3 are protected
    for index, original in enumerate(originals):
        decoupled = Image.open(out / "decoupled" / f"decoupled_{index:03d}.png")
        assert decoupled.size == (64, 64) and decoupled.mode == "RGB"
        crop = Image.open(original).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS, box=(0, 0, 96, 96))
        x, x0 = (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255) for img in (decoupled, crop))
        assert float((x - x0).abs().max()) <= 0.05 + 2.5 / 255


def test_same_command_twice_gives_the_same_lora(tmp_path, test_recognizer):
    photos = tmp_path / "photos"
    write_photos(photos, 4)
    outs = [tmp_path / f"run{i}.safetensors" for i in range(2)]
    for out in outs:
        assert run_cli_here(train_argv(photos, out, "--iterations", "1"))[0] == 0
    tensors = []
    for out in outs:
        with safe_open(str(out), framework="pt") as f:
            tensors.append({k: f.get_tensor(k) for k in f.keys()})
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
