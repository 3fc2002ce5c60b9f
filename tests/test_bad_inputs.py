"""Bad input gets a clear answer (what, which input, what to do) and nothing is lost (issue 5).

Each case checks the message and that no partial output was written: the output folder holds
exactly what it held before (and no stray temp file).
"""
from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from comfyui_iddm import atomic, lora_io
from comfyui_iddm.photos import PhotoError, PhotoSet, load_photo_folder

from conftest import files_under, insightface_t1, run_cli_here, synthetic_portrait, train_argv




def refused(argv, out: Path, before: set[str] = frozenset()) -> str:
    """Runs the CLI, expects exit 2 and an untouched output folder; returns stderr."""
    code, _, err = run_cli_here(argv)
    assert code == 2, err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert files_under(out) == set(before)
    return err


# --- the photo folder ----------------------------------------------------------------------------
def test_empty_folder(place):
    for photo in place.photos.iterdir():
        photo.unlink()
    err = refused(train_argv(place.photos, place.lora), place.out)
    assert f"photo folder {place.photos} holds no images" in err and "put the person's photos there" in err


def test_missing_folder(place):
    err = refused(train_argv(place.photos / "nope", place.lora), place.out)
    assert "does not exist or is not a folder; give the folder that holds the person's photos" in err


def test_only_non_image_files(place):
    for photo in place.photos.iterdir():
        photo.unlink()
    (place.photos / "notes.txt").write_text("hi")
    (place.photos / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    err = refused(train_argv(place.photos, place.lora), place.out)
    assert "holds no images (JPEG, PNG or WebP) (2 other file(s) skipped)" in err


def _broken_files(folder: Path) -> dict[str, str]:
    """Unusable files beside good photos: name -> the reason the user is told."""
    good = synthetic_portrait(96, seed=50)
    good.save(folder / "cut.jpg", quality=90)
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    (folder / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(5000))  # corrupt: not an image
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("shopping list")
    (folder / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (folder / "pixel.png").write_bytes(b"")
    Image.new("RGB", (1, 1), (128, 128, 128)).save(folder / "pixel.png")
    (folder / "z copy.png").write_bytes((folder / "photo_01.png").read_bytes())
    return {"cut.jpg": "not a readable image", "noise.jpg": "not a readable image",
            "empty.png": "not a readable image", "notes.txt": "not an image file (skipped)",
            "IMG_0001.HEIC": "HEIC photos cannot be read; export them as JPEG",
            "pixel.png": "only 1x1 px; a face photo needs at least 40 px on each side (skipped)",
            "z copy.png": "the same photo as photo_01.png (skipped)"}


def test_broken_and_foreign_files_are_skipped_and_reported_not_fatal(place):
    reasons = _broken_files(place.photos)
    code, out, err = run_cli_here(train_argv(place.photos, place.lora, "--iterations", "1"))
    assert code == 0, err
    for name, reason in reasons.items():
        assert f"{name}: {reason}" in err
    assert "re-save it as JPEG or PNG, or remove it (skipped)" in err
    assert files_under(place.out) == {"person.safetensors"}


def test_every_common_mode_is_usable(tmp_path):
    """Alpha, grey, CMYK, 16-bit, animations: all load as 3-channel crops (details in test_photos)."""
    cv2 = pytest.importorskip("cv2")
    face = synthetic_portrait(96, seed=9)
    face.convert("RGBA").save(tmp_path / "alpha.png")
    face.convert("L").save(tmp_path / "grey.jpg")
    face.convert("CMYK").save(tmp_path / "cmyk.jpg")
    cv2.imwrite(str(tmp_path / "deep.png"), (np.asarray(face.convert("L"), np.uint16) * 257))
    face.save(tmp_path / "anim.gif", save_all=True, append_images=[Image.new("RGB", (96, 96))], duration=50)
    face.save(tmp_path / "anim.webp", save_all=True, append_images=[Image.new("RGB", (96, 96))], duration=50)
    photo_set = load_photo_folder(tmp_path, 64)
    assert photo_set.issues == [] and len(photo_set) == 6 and photo_set.images.shape[1:] == (3, 64, 64)
    grey = photo_set.images[photo_set.names.index("deep.png")]
    assert torch.equal(grey[0], grey[1]) and 0.1 < float(grey.mean()) < 0.9


def test_exif_rotated_photos_are_trained_upright(tmp_path):
    upright = synthetic_portrait(96, seed=4).crop((0, 0, 96, 80))
    upright.save(tmp_path / "a_upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: stored rotated, to be shown rotated 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "b_rotated.jpg", exif=exif, quality=98)
    photo_set = load_photo_folder(tmp_path, 64)
    a, b = photo_set.images
    assert float((a - b).abs().mean()) < 0.02  # same pixels up to JPEG loss; sideways would differ ~0.2


def test_several_faces_and_no_face_with_mtcnn(tmp_path, mtcnn):
    group = Image.open(insightface_t1()).convert("RGB")
    group.save(tmp_path / "group.jpg")
    Image.new("RGB", (300, 300), (200, 190, 180)).save(tmp_path / "blank.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    with pytest.raises(PhotoError) as error:
        load_photo_folder(tmp_path, 64, mtcnn)
    message = str(error.value)
    assert "group.jpg: 6 faces of similar size; use photos of the person alone, or crop the others out" in message
    assert "blank.png: no face found" in message and "noise.png: no face found" in message
    assert "Add clear photos of the person's face" in message


def _faces_of_t1(mtcnn) -> tuple[Image.Image, list]:
    group = Image.open(insightface_t1()).convert("RGB")
    from comfyui_iddm.photos import pil_to_tensor
    return group, mtcnn.detect(pil_to_tensor(group)[None])[0]


def test_a_single_face_is_used_and_a_tiny_face_is_refused(tmp_path, mtcnn):
    group, faces = _faces_of_t1(mtcnn)
    x1, y1, x2, y2 = faces[0].box
    pad = (x2 - x1) * 0.8
    single = group.crop((int(max(0, x1 - pad)), int(max(0, y1 - pad)), int(x2 + pad), int(y2 + pad)))
    single.save(tmp_path / "one.png")
    scale = 30 / (x2 - x1)  # the face becomes ~30 px wide: detectable by MTCNN, below MIN_FACE_SIDE
    canvas = Image.new("RGB", (400, 400), (90, 90, 90))
    canvas.paste(single.resize((max(1, int(single.width * scale)), max(1, int(single.height * scale)))), (180, 180))
    canvas.save(tmp_path / "small.png")
    photo_set = load_photo_folder(tmp_path, 64, mtcnn)
    assert photo_set.names == ["one.png"]
    assert [(i.name, i.reason.split(" (")[0]) for i in photo_set.issues] == [("small.png", "the face is too small")]
    assert "use a closer or larger photo" in photo_set.issues[0].reason


# --- the split -----------------------------------------------------------------------------------
def test_fewer_photos_than_the_split_needs(place):
    for photo in sorted(place.photos.iterdir())[1:]:
        photo.unlink()
    err = refused(train_argv(place.photos, place.lora), place.out)
    assert "1 usable photo(s); IDDM needs at least 2" in err and "Add photos of the same person" in err


def test_reference_count_leaves_no_protection_photo(place):
    err = refused(train_argv(place.photos, place.lora, "--reference", "4"), place.out)
    assert "reference count 4 leaves an empty set with 4 usable photos; choose between 1 and 3" in err


def test_overlapping_reference_and_protection_sets_are_refused(tiny_recognizer):
    from comfyui_iddm.backends.diffusers_backend import load_denoiser
    from comfyui_iddm.pipeline import train_on_photos

    from conftest import synthetic_photos, tiny_config

    images = synthetic_photos(3)
    as_set = lambda idx: PhotoSet(images[idx], torch.zeros(len(idx), 5, 2), [str(i) for i in idx])
    config = tiny_config()
    with pytest.raises(PhotoError, match="protection photo 2 is also in the reference set; the two sets must be "
                                         "disjoint. Give each photo to only one of them."):
        train_on_photos(load_denoiser("tiny", config), as_set([0, 1]), as_set([2, 1]), config)


# --- knobs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, message", [
    ("--eta", "-0.1", "eta=-0.1 is out of range; allowed range is [0, 1]"),
    ("--rho", "1.5", "rho=1.5 is out of range; allowed range is [0, 1]"),
    ("--rho", "-0.01", "rho=-0.01 is out of range; allowed range is [0, 1]"),
    ("--tau", "0", "tau=0.0 is out of range; allowed range is (0, 100]"),
    ("--tau", "-1", "tau=-1.0 is out of range; allowed range is (0, 100]"),
    ("--iterations", "0", "iterations=0 is out of range; allowed range is [1, 1000]"),
    ("--pgd-steps", "-1", "pgd_steps=-1 is out of range; allowed range is [0, 10000]"),
    ("--alpha", "0", "pgd_alpha=0.0 is out of range; allowed range is (0, 1]"),
    ("--resolution", "100", "resolution=100 is not a multiple of 8; use e.g. 96"),
    ("--rho", "abc", "argument --rho: invalid float value: 'abc'"),
    ("--iterations", "2.5", "argument --iterations: invalid int value: '2.5'"),
])
def test_out_of_range_knobs_exit_2_with_the_knob_value_and_range(place, flag, value, message):
    err = refused(train_argv(place.photos, place.lora, flag, value), place.out)
    assert message in err


# --- outputs -------------------------------------------------------------------------------------
def test_an_existing_lora_is_refused_and_untouched_unless_overwrite(place):
    place.lora.write_bytes(b"old LoRA")
    err = refused(train_argv(place.photos, place.lora), place.out, {"person.safetensors"})
    assert f"{place.lora} already exists; choose another name or allow overwriting (--overwrite" in err
    assert place.lora.read_bytes() == b"old LoRA"
    code, _, err = run_cli_here(train_argv(place.photos, place.lora, "--iterations", "1", "--overwrite"))
    assert code == 0, err
    assert lora_io.load_lora(place.lora)[0]


def test_an_existing_report_or_non_empty_decoupled_folder_is_refused(place):
    (place.out / "report.json").write_text("{}")
    err = refused(train_argv(place.photos, place.lora, "--report", place.out / "report.json"), place.out,
                  {"report.json"})
    assert "report.json already exists" in err
    (place.out / "xp").mkdir()
    (place.out / "xp" / "mine.png").write_bytes(b"x")
    err = refused(train_argv(place.photos, place.lora, "--decoupled-out", place.out / "xp"), place.out,
                  {"report.json", "xp", "xp/mine.png"})
    assert "xp is not empty; choose an empty folder for X' or allow overwriting (--overwrite)" in err


def test_a_missing_output_folder(place):
    err = refused(train_argv(place.photos, place.out / "sub" / "person.safetensors"), place.out)
    assert f"the folder {place.out / 'sub'} for output person.safetensors does not exist; create it first" in err


def _refuse_temp_files_in(monkeypatch, folder: Path, error: int) -> None:
    """Simulates a read-only (EROFS/EACCES) folder: creating any file in it fails (root ignores chmod)."""
    real = atomic.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise OSError(error, os.strerror(error), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)


def test_a_read_only_output_folder_is_refused_before_any_training(place, monkeypatch):
    from comfyui_iddm.backends import diffusers_backend

    place.lora.write_bytes(b"old LoRA")
    _refuse_temp_files_in(monkeypatch, place.out, errno.EROFS)
    monkeypatch.setattr(diffusers_backend, "load_denoiser", lambda *a, **k: pytest.fail("training started"))
    err = refused(train_argv(place.photos, place.lora, "--overwrite"), place.out, {"person.safetensors"})
    assert f"cannot write person.safetensors in {place.out} (Read-only file system); choose a folder you " \
           "can write to" in err
    assert place.lora.read_bytes() == b"old LoRA"


def test_a_read_only_decoupled_folder_is_refused_before_any_training(place, monkeypatch):
    from comfyui_iddm.backends import diffusers_backend

    (place.out / "xp").mkdir()
    _refuse_temp_files_in(monkeypatch, place.out / "xp", errno.EACCES)
    monkeypatch.setattr(diffusers_backend, "load_denoiser", lambda *a, **k: pytest.fail("training started"))
    err = refused(train_argv(place.photos, place.lora, "--decoupled-out", place.out / "xp"), place.out, {"xp"})
    assert "cannot write the decoupled photos (X')" in err and "Permission denied" in err


def test_disk_full_while_writing_the_lora_leaves_the_old_file_and_no_partial_one(place, monkeypatch):
    place.lora.write_bytes(b"old LoRA")

    real_write = Path.write_bytes

    def half_then_full(self, data):
        if not self.name.startswith(".person.safetensors.") or self.suffix != ".tmp":
            return real_write(self, data)
        real_write(self, data[:100])  # part of the LoRA reached the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    code, _, err = run_cli_here(train_argv(place.photos, place.lora, "--iterations", "1", "--overwrite"))
    assert code == 2
    assert f"could not write {place.lora} (No space left on device); free some disk space" in err
    assert "person.safetensors was left as it was" in err and "rerun the same command with --resume --overwrite" in err
    assert place.lora.read_bytes() == b"old LoRA"
    left = files_under(place.out)
    assert {p for p in left if not p.startswith(".person.safetensors.iddm-state")} == {"person.safetensors"}


def test_disk_full_while_writing_decoupled_photos_leaves_no_partial_png(place, monkeypatch):
    real_save = Image.Image.save
    written = []

    def save(self, fp, format=None, **params):
        if format == "PNG" and written:
            Path(fp).write_bytes(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(fp)
        return real_save(self, fp, format, **params)

    monkeypatch.setattr(Image.Image, "save", save)
    code, _, err = run_cli_here(train_argv(place.photos, place.lora, "--iterations", "1",
                                           "--decoupled-out", place.out / "xp"))
    assert code == 2 and "No space left on device" in err
    visible = {p for p in files_under(place.out) if not p.startswith(".person.safetensors.iddm-state")}
    assert visible == {"xp", "xp/decoupled_000.png"}  # the first, complete; no partial second, no LoRA
    assert Image.open(place.out / "xp" / "decoupled_000.png").size == (64, 64)


# --- models and weights --------------------------------------------------------------------------
class _Exploit:
    """Unpickling this creates a marker file: proof that code in the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": {"model.diffusion_model.x": _Exploit(marker)}}))


def test_a_base_that_is_not_a_diffusion_model(place):
    lora = place.out.parent / "some_lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    err = refused(train_argv(place.photos, place.lora, "--base", lora), place.out)
    assert "some_lora.safetensors is not a Stable Diffusion checkpoint (it has no model.diffusion_model.* " \
           "weights; is it a LoRA, VAE or embedding?)" in err
    notes = place.out.parent / "notes.txt"
    notes.write_text("x")
    assert "notes.txt is not a checkpoint file" in refused(train_argv(place.photos, place.lora, "--base", notes), place.out)
    err = refused(train_argv(place.photos, place.lora, "--base", place.out.parent / "missing.safetensors"), place.out)
    assert "is neither 'tiny', a diffusers model folder nor a checkpoint file (it does not exist)" in err


def test_a_pickled_checkpoint_is_refused_without_running_its_code(place):
    marker = place.out.parent / "pwned"
    _malicious_pickle(place.out.parent / "model.ckpt", marker)
    err = refused(train_argv(place.photos, place.lora, "--base", place.out.parent / "model.ckpt"), place.out)
    assert "model.ckpt could not be read as a checkpoint" in err
    assert not marker.exists()


def test_recognizer_weights_of_another_network_are_refused(place):
    weights = place.out.parent / "weights"
    weights.mkdir()
    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3)}, str(weights / "mobilefacenet.safetensors"))
    err = refused(train_argv(place.photos, place.lora, "--weights-dir", weights, "--recognizers", "mobilefacenet",
                             "--evaluators", "mobilefacenet"), place.out)
    assert "mobilefacenet.safetensors is not a MobileFaceNet checkpoint we know" in err


def test_recognizer_weights_that_do_not_fit_the_architecture_are_refused(place):
    from comfyui_iddm.faces.nets.mobilefacenet import MobileFaceNetFoamliu

    state = MobileFaceNetFoamliu().state_dict()
    key = next(k for k, v in state.items() if v.ndim == 4)
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 2)  # right names, wrong shape
    weights = place.out.parent / "weights"
    weights.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights / "mobilefacenet.safetensors"))
    err = refused(train_argv(place.photos, place.lora, "--weights-dir", weights, "--recognizers", "mobilefacenet",
                             "--evaluators", "mobilefacenet"), place.out)
    assert "mobilefacenet.safetensors does not fit the mobilefacenet architecture" in err


def test_pickled_recognizer_weights_are_refused_without_running_their_code(place):
    weights = place.out.parent / "weights"
    weights.mkdir()
    marker = place.out.parent / "pwned"
    _malicious_pickle(weights / "mobilefacenet.pth", marker)
    err = refused(train_argv(place.photos, place.lora, "--weights-dir", weights, "--recognizers", "mobilefacenet",
                             "--evaluators", "mobilefacenet"), place.out)
    assert "mobilefacenet.pth holds pickled Python objects (not just tensors), and loading it would run code " \
           "from the file, so it is refused" in err
    assert not marker.exists()


def test_missing_recognizer_weights_say_where_to_put_them(place):
    weights = place.out.parent / "weights"
    weights.mkdir()
    err = refused(train_argv(place.photos, place.lora, "--weights-dir", weights, "--recognizers", "irse50",
                             "--evaluators", "irse50"), place.out)
    assert f"no weights for the irse50 face recognizer" in err and str(weights) in err


@pytest.fixture
def small_disk(tmp_path):
    """A real 48 KB file system (tmpfs) when this process may mount one (root on Linux), else skip."""
    import subprocess

    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root on Linux); the simulated disk-full tests cover it")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_stops_cleanly_and_keeps_the_old_lora(place, small_disk):
    lora = small_disk / "person.safetensors"
    lora.write_bytes(b"old LoRA")
    code, _, err = run_cli_here(train_argv(place.photos, lora, "--iterations", "1", "--overwrite"))
    assert code == 2 and "Traceback" not in err
    assert "No space left on device" in err and "free some disk space" in err
    assert lora.read_bytes() == b"old LoRA"
    assert files_under(small_disk) <= {"person.safetensors", ".person.safetensors.iddm-state"}
