"""`iddm rid-train` (issue 14): a network file from a folder of faces, settings only in its header, bad
input refused before anything is written; `iddm cloak --method rid` with it. CPU, the tiny model, no
downloads."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from comfyui_iddm.photos import load_photo_folder, pil_to_tensor, read_image
from comfyui_iddm.rid import cloak_photos
from comfyui_iddm.rid_weights import load_rid

from conftest import files_under, run_cli_here, synthetic_photos, write_photos


def rid_argv(faces, out, *extra):
    return ["rid-train", str(faces), "--base", "tiny", "--out", str(out), "--detector", "none",
            "--resolution", "64", "--steps", "4", "--batch-size", "2", "--pairs", "none", *extra]


def test_rid_train_writes_a_network_that_cloaks_within_the_budget(tmp_path):
    faces = tmp_path / "private faces"
    write_photos(faces, 4, size=64, names=[f"alice_{i}.png" for i in range(4)])
    out = tmp_path / "rid.safetensors"
    code, stdout, stderr = run_cli_here(rid_argv(faces, out, "--eta", "0.06"))
    assert code == 0, stderr
    assert "RID network written" in stdout and "PSNR" in stdout
    with safe_open(str(out), framework="pt") as f:
        header = f.metadata()
    assert not any("alice" in v or "private faces" in v for v in header.values())
    assert header["rid.eta"] == "0.06" and header["rid.regulariser"] == "none"
    net = load_rid(out)
    photos = synthetic_photos(2, size=64)
    assert (cloak_photos(net, photos) - photos).abs().max() <= 0.03 + 1e-6


def test_rid_train_makes_aspl_pairs_for_its_regulariser(tmp_path):
    faces = tmp_path / "faces"
    write_photos(faces, 4, size=64)
    out = tmp_path / "rid.safetensors"
    argv = rid_argv(faces, out)[:-2]  # without "--pairs none"
    code, _, stderr = run_cli_here(argv + ["--pair-iterations", "1", "--pair-group", "2"])
    assert code == 0, stderr
    assert "pairs: group 2/2" in stderr and "regulariser" in stderr
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["rid.regulariser"].startswith("aspl pairs")


@pytest.mark.parametrize("extra, message", [
    (["--base", "tiny,tiny"], "listed twice"),
    (["--eta", "0"], "eta=0.0 is out of range"),
    (["--resolution", "100"], "multiple of 8"),
    (["--batch-size", "9"], "fewer than --batch-size 9"),
    (["--timesteps", "500,20"], "timesteps"),
    (["--steps", "0"], "steps=0"),
])
def test_rid_train_refuses_bad_input_and_writes_nothing(tmp_path, extra, message):
    faces = tmp_path / "faces"
    write_photos(faces, 4, size=64)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, stderr = run_cli_here(rid_argv(faces, out_dir / "rid.safetensors") + extra)
    assert code == 2 and message in stderr
    assert files_under(out_dir) == set()


def test_rid_train_refuses_missing_faces_and_a_folder_or_existing_file_as_output(tmp_path):
    faces = tmp_path / "faces"
    write_photos(faces, 4, size=64)
    code, _, stderr = run_cli_here(rid_argv(tmp_path / "nowhere", tmp_path / "rid.safetensors"))
    assert code == 2 and "does not exist" in stderr
    code, _, stderr = run_cli_here(rid_argv(faces, tmp_path))
    assert code == 2 and "is a folder" in stderr
    existing = tmp_path / "rid.safetensors"
    existing.write_bytes(b"old")
    code, _, stderr = run_cli_here(rid_argv(faces, existing))
    assert code == 2 and "already exists" in stderr and existing.read_bytes() == b"old"


def test_cloak_with_the_trained_network_writes_pixels_only_within_the_budget(tmp_path):
    from conftest import png_chunk_types

    faces, photos = tmp_path / "faces", tmp_path / "bob"
    write_photos(faces, 4, size=64)
    write_photos(photos, 3, size=64, names=[f"bob_{i}.png" for i in range(3)], seed=7)
    network, out = tmp_path / "rid.safetensors", tmp_path / "public"
    assert run_cli_here(rid_argv(faces, network))[0] == 0
    code, stdout, stderr = run_cli_here(["cloak", str(photos), "--method", "rid", "--rid-weights", str(network),
                                         "--out", str(out), "--detector", "none", "--resolution", "64"])
    assert code == 0, stderr
    assert files_under(out) == {f"cloaked_{i:03d}.png" for i in range(3)}
    for path in sorted(out.iterdir()):
        assert png_chunk_types(path.read_bytes()) == [b"IHDR", b"IDAT", b"IEND"]
        assert b"bob" not in path.read_bytes()
    assert "method rid" in stdout and "bob" not in stdout + stderr
    assert "6.4 of 255" in stdout  # the cloak's budget (0.05 in [-1,1] pixels)
    originals = load_photo_folder(photos, 64).images
    cloaked = torch.stack([pil_to_tensor(read_image(p)) for p in sorted(out.iterdir())])
    assert (cloaked - originals).abs().max() <= 0.025 + 1 / 255
