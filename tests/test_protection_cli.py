"""`iddm cloak`, `iddm attack` and `iddm evaluate-protection` on the tiny model (in-process, the test
recognizer): what they write and print, that no photo name or path leaves the user's terminal, and
that bad input is refused before anything is written."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_iddm.lora_io import load_lora

from conftest import TEST_RECOGNIZER, files_under, png_chunk_types, run_cli_here, write_photos

NAMES = ["anna_beach.png", "anna_home.png", "anna_park.png", "anna_work.png"]
FAST_CLOAK = ("--detector", "none", "--resolution", "64", "--iterations", "1", "--ft-steps", "1",
              "--pgd-steps", "2", "--threads", "1")
FAST_EVAL = (*FAST_CLOAK, "--base", "tiny", "--attack-steps", "2", "--recognizers", TEST_RECOGNIZER)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "private"
    write_photos(folder, 4, names=NAMES)
    return folder


def assert_no_names(text: str, *paths: Path) -> None:
    for name in NAMES + [Path(n).stem for n in NAMES]:
        assert name not in text
    for path in paths:
        assert str(path) not in text


@pytest.mark.parametrize("method", ["aspl", "noise"])
def test_cloak_writes_numbered_images_with_nothing_but_the_pixels(photos, tmp_path, method):
    out = tmp_path / "public"
    code, stdout, stderr = run_cli_here(["cloak", str(photos), "--method", method, "--base", "tiny",
                                         "--out", str(out), *FAST_CLOAK])
    assert code == 0, stderr
    assert files_under(out) == {f"cloaked_{i:03d}.png" for i in range(4)}
    for path in out.iterdir():
        assert png_chunk_types(path.read_bytes()) == [b"IHDR", b"IDAT", b"IEND"]  # no text, EXIF, ICC or time
        assert Image.open(path).size == (96, 96)  # the whole photo, the cloak pasted in
        raw = zlib.decompress(path.read_bytes()[8 + 8 + 13 + 4 + 8:])  # no name hidden anywhere
        assert b"anna" not in path.read_bytes() and b"anna" not in raw
    assert f"method {method}" in stdout and "PSNR" in stdout and "6.4 of 255" in stdout
    assert ("surrogate model's denoising loss" in stdout) == (method == "aspl")
    assert_no_names(stdout, photos)


def test_cloak_pastes_the_change_into_the_whole_photo_or_writes_the_crops(tmp_path):
    """Wide photos: the face crop is the middle square; outside it the posted photo is the original to
    the bit, inside no pixel moves by more than the budget (and one 8-bit step), and a personalization's
    own crop of the posted photo still holds the cloak."""
    folder = tmp_path / "private"
    folder.mkdir()
    rng = np.random.default_rng(0)
    originals = [rng.integers(40, 216, (120, 160, 3), dtype=np.uint8) for _ in range(2)]
    for i, pixels in enumerate(originals):
        Image.fromarray(pixels).save(folder / NAMES[i])
    out = tmp_path / "public"
    code, stdout, stderr = run_cli_here(["cloak", str(folder), "--method", "noise", "--out", str(out), *FAST_CLOAK])
    assert code == 0, stderr
    budget = 0.025 * 255  # --eta 0.05 in [-1,1]
    for i, original in enumerate(originals):
        posted = np.asarray(Image.open(out / f"cloaked_{i:03d}.png")).astype(int)
        assert posted.shape == original.shape
        change = posted - original
        assert not change[:, :20].any() and not change[:, 140:].any()  # the square is x in [20, 140)
        assert np.abs(change[:, 20:140]).max() <= budget + 1 and np.abs(change[:, 20:140]).mean() > 2
    kept = stdout.split("(cosine to the cloak's change; 1 = all): ")[1].split()
    assert float(kept[0]) > 0.8, stdout  # 120 px squares hold a 64 px cloak, up to rounding
    crops = tmp_path / "crops"
    code, stdout, stderr = run_cli_here(["cloak", str(folder), "--method", "noise", "--out", str(crops), "--crops",
                                         *FAST_CLOAK])
    assert code == 0, stderr
    assert {Image.open(p).size for p in crops.iterdir()} == {(64, 64)} and "face crops" in stdout


def test_cloak_jpeg_output_has_no_exif(photos, tmp_path):
    out = tmp_path / "public"
    code, _, stderr = run_cli_here(["cloak", str(photos), "--method", "noise", "--out", str(out),
                                    "--format", "jpeg", "--quality", "90", *FAST_CLOAK])
    assert code == 0, stderr
    for path in out.iterdir():
        image = Image.open(path)
        assert path.suffix == ".jpg" and not image.getexif() and "icc_profile" not in image.info


@pytest.mark.parametrize("extra, expected", [
    (["--method", "aspl"], "needs the diffusion model"),
    (["--method", "noise", "--quality", "0"], "--quality 0 must be between 1 and 100"),
    (["--method", "noise", "--threads", "0"], "--threads 0"),
    (["--method", "noise", "--eta", "2"], "eta=2.0 is out of range"),
    (["--method", "noise", "--rid-weights", "missing.safetensors"], "--rid-weights missing.safetensors does not exist"),
    (["--method", "noise", "--class-dir", "classes", "--prior-weight", "1"], "feeds ASPL's fine-tunes"),
    (["--method", "glaze"], "invalid choice: 'glaze'"),
])
def test_cloak_refuses_bad_input_and_writes_nothing(photos, tmp_path, monkeypatch, extra, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "classes").mkdir()
    write_photos(tmp_path / "classes", 1)
    out = tmp_path / "public"
    code, _, stderr = run_cli_here(["cloak", str(photos), "--out", str(out), *FAST_CLOAK, *extra])
    assert code != 0 and expected in stderr
    assert not out.exists()


def test_cloak_refuses_a_used_output_folder_or_a_file(photos, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    code, _, stderr = run_cli_here(["cloak", str(photos), "--method", "noise", "--out", str(used), *FAST_CLOAK])
    assert code != 0 and "is not empty" in stderr and files_under(used) == {"keep.txt"}
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, _, stderr = run_cli_here(["cloak", str(photos), "--method", "noise", "--out", str(a_file), *FAST_CLOAK])
    assert code != 0 and "is a file, not a folder" in stderr


def test_attack_writes_a_plain_kohya_lora_without_iddm_settings(photos, tmp_path):
    out = tmp_path / "attack.safetensors"
    argv = ["attack", str(photos), "--base", "tiny", "--out", str(out), "--detector", "none",
            "--resolution", "64", "--ft-steps", "3", "--threads", "1"]
    code, stdout, stderr = run_cli_here(argv)
    assert code == 0, stderr
    state, metadata = load_lora(out)
    assert state and all(k.startswith("lora_unet_") for k in state)
    assert set(metadata) == {"ss_network_module", "ss_network_dim", "ss_network_alpha"}  # not an IDDM LoRA
    assert b"anna" not in out.read_bytes()
    assert "3 fine-tune steps" in stdout
    assert_no_names(stdout, photos)
    code, _, stderr = run_cli_here(argv)  # the file exists now
    assert code != 0 and "already exists" in stderr


def evaluate(photos, *extra) -> dict:
    code, stdout, stderr = run_cli_here(["evaluate-protection", "--clean", str(photos), *FAST_EVAL, "--json",
                                         *map(str, extra)])
    assert code == 0, stderr
    assert_no_names(stdout, photos)
    return json.loads(stdout)


def test_evaluate_protection_measures_every_method_the_same_way(photos, test_recognizer):
    summary = evaluate(photos, "--method", "aspl,noise")
    assert (summary["published"], summary["held_out"]) == (2, 2)
    rows = {row["method"]: row for row in summary["rows"]}
    assert list(rows) == ["no attack (base model)", "none", "aspl", "noise"]
    assert rows["none"]["change"] == {"linf": 0.0, "psnr": None, "ssim": 1.0}
    budget = 0.025  # eta 0.05 in [-1,1] units
    for method in ("aspl", "noise"):
        assert rows[method]["eta"] == pytest.approx(budget)
        assert rows[method]["change"]["linf"] <= budget + 1e-4
    assert rows["noise"]["change"]["psnr"] < rows["aspl"]["change"]["psnr"]  # noise uses the whole budget
    assert rows["aspl"]["seconds_per_photo"] > rows["noise"]["seconds_per_photo"]
    for row in rows.values():
        assert set(row["x0_cosine"]) == {TEST_RECOGNIZER} and row["denoise_loss"] > 0
    learnt = summary["attack_learnt"]
    assert set(learnt["x0_cosine_rise"]) == {TEST_RECOGNIZER} and isinstance(learnt["identity_learnt"], bool)
    assert learnt["denoise_loss_drop"] == pytest.approx(
        rows["no attack (base model)"]["denoise_loss"] - rows["none"]["denoise_loss"], abs=1e-4)
    # the same measurement for every row: an unchanged model measures the same twice
    assert rows["no attack (base model)"]["denoise_loss"] == evaluate(photos)["rows"][0]["denoise_loss"]


def test_evaluate_protection_table_names_methods_never_photos(photos, test_recognizer):
    code, stdout, stderr = run_cli_here(["evaluate-protection", "--clean", str(photos), *FAST_EVAL,
                                         "--method", "noise"])
    assert code == 0, stderr
    assert "method" in stdout and "noise" in stdout and "6.4/255" in stdout and f"x0 {TEST_RECOGNIZER}" in stdout
    assert "the attack on unprotected photos against the base model" in stdout
    assert_no_names(stdout, photos)


@pytest.mark.parametrize("form", ["whole photos", "--crops"])
def test_evaluate_protection_takes_protected_files_from_iddm_cloak(photos, tmp_path, test_recognizer, form):
    """Crops are taken as they are; whole photos are cut at the clean photo's own square, where the
    change the crop sees may exceed the budget a little (Lanczos resampling rings)."""
    published, held_out, cloaked = tmp_path / "published", tmp_path / "held", tmp_path / "cloaked"
    write_photos(published, 2, seed=1)
    write_photos(held_out, 2, seed=2)
    crops = [form] if form == "--crops" else []
    code, _, stderr = run_cli_here(["cloak", str(published), "--method", "noise", "--out", str(cloaked), *crops,
                                    *FAST_CLOAK])
    assert code == 0, stderr
    summary = evaluate(published, "--protected", cloaked, "--held-out", held_out)
    rows = {row["method"]: row for row in summary["rows"]}
    assert list(rows) == ["no attack (base model)", "none", "given"]
    if crops:
        assert rows["given"]["change"]["linf"] == pytest.approx(0.025, abs=1 / 255)  # 8-bit rounding of the PNGs
    else:
        assert 0.02 < rows["given"]["change"]["linf"] < 0.025 * 1.5 and rows["given"]["change"]["psnr"] < 40


@pytest.mark.parametrize("extra, expected", [
    (["--protected", "{photos}"], "--protected needs --held-out"),
    (["--protected", "{three}", "--held-out", "{photos}"], "--protected holds 3 image(s) but 4"),
    (["--method", "glaze"], "--method glaze: unknown"),
    (["--attack-steps", "0"], "--attack-steps 0"),
    (["--generations", "1"], "scoring generations needs a face detector"),
    (["--held-out-count", "4"], "--held-out-count 4 leaves no published"),
])
def test_evaluate_protection_refuses_bad_input(photos, tmp_path, test_recognizer, extra, expected):
    write_photos(tmp_path / "three", 3)
    extra = [e.format(photos=photos, three=tmp_path / "three") for e in extra]
    code, _, stderr = run_cli_here(["evaluate-protection", "--clean", str(photos), *FAST_EVAL, *extra])
    assert code != 0 and expected in stderr, stderr


def test_evaluate_protection_refuses_protected_photos_of_another_size(photos, tmp_path, test_recognizer):
    held_out, other = tmp_path / "held", tmp_path / "other"
    write_photos(held_out, 2, seed=2)
    write_photos(other, 4, size=80)
    code, _, stderr = run_cli_here(["evaluate-protection", "--clean", str(photos), *FAST_EVAL,
                                    "--protected", str(other), "--held-out", str(held_out)])
    assert code != 0 and "protected photo 1 is 80x80" in stderr


def test_generations_are_scored_with_fsr_and_identity(tmp_path, mtcnn):
    """Plumbing only: the tiny model draws no faces (FSR 0); with a real checkpoint these are the
    papers' figures."""
    from comfyui_iddm.demo import sample_private_set
    from comfyui_iddm.photos import tensor_to_pil

    from conftest import insightface_t1, register_test_recognizer

    insightface_t1()  # skips without the sample photo
    folder = tmp_path / "faces"
    folder.mkdir()
    for i, image in enumerate(sample_private_set(96, mtcnn, count=4).images):
        tensor_to_pil(image).save(folder / f"face_{i}.png")
    undo = register_test_recognizer()
    try:
        code, stdout, stderr = run_cli_here(["evaluate-protection", "--clean", str(folder), "--base", "tiny",
                                             "--resolution", "64", "--attack-steps", "1", "--detector", "mtcnn",
                                             "--recognizers", TEST_RECOGNIZER, "--generations", "1", "--json",
                                             "--threads", "1"])
    finally:
        undo()
    assert code == 0, stderr
    rows = json.loads(stdout)["rows"]
    for row in rows:
        assert row["generation"]["images"] == 2 and 0.0 <= row["generation"]["fsr"] <= 1.0
        assert set(row["generation"]["cosine"]) == {TEST_RECOGNIZER}
