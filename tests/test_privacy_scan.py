"""Privacy hygiene (issue 5): a whole `iddm train` run, then every file it wrote (outputs, report,
LoRA header and bytes, X' PNG metadata, caches and temp files under a private HOME/TMPDIR) and its
stdout/stderr are scanned for the photos' names, their folder path, their hashes and their pixels.
X' pixels are expected only inside the X' folder the user asked for."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from comfyui_iddm.photos import load_photo_folder, read_image

from conftest import insightface_t1, png_chunk_types, run_cli, train_argv, write_photos

SECRET_FOLDER = "Jane_Doe_private_photos_q8z"
SECRET_NAMES = [f"jane_doe_beach_2019_{tag}.png" for tag in ("x7q", "k2m", "p9w", "r4t")]


def photo_needles(photos: list[Path], crops: torch.Tensor) -> dict[str, bytes]:
    """What must not appear anywhere: names, the folder path, hashes, raw and float pixel runs of the
    photos and of their training crops (`crops`, [N,3,R,R] in [0,1] as the engine holds them)."""
    needles: dict[str, bytes] = {}
    folder = photos[0].parent
    for text in (SECRET_FOLDER, str(folder), str(folder.resolve())):
        needles[f"path {text}"] = text.encode()
    for path in photos:
        data = path.read_bytes()
        needles[f"name {path.name}"] = path.name.encode()
        needles[f"name {path.stem}"] = path.stem.encode()
        needles[f"utf16 {path.name}"] = path.name.encode("utf-16-le")
        for algorithm in ("sha256", "md5", "sha1"):
            digest = hashlib.new(algorithm, data)
            needles[f"hex {algorithm} {path.name}"] = digest.hexdigest().encode()
            needles[f"raw {algorithm} {path.name}"] = digest.digest()
    arrays = [(f"photo {p.name}", np.asarray(read_image(p))) for p in photos]
    arrays += [(f"crop {i}", (crop.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)) for i, crop in enumerate(crops)]
    for label, array in arrays:
        for row in (array.shape[0] // 3, array.shape[0] // 2, 2 * array.shape[0] // 3):
            needles[f"{label} uint8 row {row}"] = array[row, array.shape[1] // 3:array.shape[1] // 3 + 12].tobytes()
            # As the engine holds images: float32 in [0,1], channels first (a run along one channel's row).
            needles[f"{label} float32 row {row}"] = (array[row, 8:20, 0].astype(np.float32) / 255).tobytes()
    return needles


def scan(blob: bytes, needles: dict[str, bytes]) -> list[str]:
    """Labels of the needles found; names, paths and hex digests also in any letter case."""
    lowered = blob.lower()
    return [label for label, needle in needles.items()
            if needle in blob or (label.startswith(("name", "path", "hex")) and needle.lower() in lowered)]


def test_the_scanner_finds_a_planted_leak(tmp_path):
    photos = write_photos(tmp_path / SECRET_FOLDER, 2, names=SECRET_NAMES)
    crops = load_photo_folder(photos[0].parent, 64).images
    needles = photo_needles(photos, crops)
    leaked = json.dumps({"source": str(photos[0])}).encode() + hashlib.md5(photos[1].read_bytes()).hexdigest().encode()
    found = scan(leaked, needles)
    assert f"name {SECRET_NAMES[0].upper()}" not in needles  # case-insensitive matching, one needle
    assert {f"name {SECRET_NAMES[0]}", f"path {SECRET_FOLDER}", f"hex md5 {SECRET_NAMES[1]}"} <= set(found)
    assert scan(str(photos[0]).upper().encode(), needles)
    as_float = crops[1].numpy().tobytes()  # e.g. a tensor dump
    as_png_pixels = (crops[1].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8).tobytes()
    assert any(label.startswith("crop 1 float32") for label in scan(as_float, needles))
    assert any(label.startswith("crop 1 uint8") for label in scan(as_png_pixels, needles))


def _real_faces(folder: Path, mtcnn) -> list[Path]:
    """Four single faces cut from insightface's t1.jpg, saved under the secret names."""
    from comfyui_iddm.photos import pil_to_tensor

    group = Image.open(insightface_t1()).convert("RGB")
    faces = sorted(mtcnn.detect(pil_to_tensor(group)[None])[0], key=lambda f: f.box[0])[:4]
    folder.mkdir(parents=True)
    paths = []
    for face, name in zip(faces, SECRET_NAMES):
        x1, y1, x2, y2 = face.box
        pad = (x2 - x1) * 0.9
        group.crop((int(max(0, x1 - pad)), int(max(0, y1 - pad)), int(x2 + pad), int(y2 + pad))).save(folder / name)
        paths.append(folder / name)
    return paths


@pytest.mark.parametrize("detector", ["none", pytest.param("mtcnn", marks=pytest.mark.slow)])
def test_a_whole_training_run_leaks_nothing_about_the_photos(tmp_path, detector, request):
    if detector == "mtcnn":
        photos = _real_faces(tmp_path / SECRET_FOLDER, request.getfixturevalue("mtcnn"))
    else:
        photos = write_photos(tmp_path / SECRET_FOLDER, 4, names=SECRET_NAMES)
    out, home = tmp_path / "out", tmp_path / "home"
    out.mkdir()
    (home / "tmp").mkdir(parents=True)
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "TMPDIR": str(home / "tmp"),
           "MPLCONFIGDIR": str(home / ".mpl")}
    result = run_cli(train_argv(photos[0].parent, out / "person.safetensors", "--detector", detector,
                                "--report", out / "report.json", "--decoupled-out", out / "decoupled"),
                     cwd=home, env=env)
    assert result.returncode == 0, result.stderr

    detector = request.getfixturevalue("mtcnn") if detector == "mtcnn" else None
    needles = photo_needles(photos, load_photo_folder(photos[0].parent, 64, detector).images)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET_FOLDER not in p.parts]
    assert out / "person.safetensors" in written and out / "report.json" in written
    leaks = {"stdout": scan(result.stdout.encode(), needles), "stderr": scan(result.stderr.encode(), needles)}
    for path in written:
        if path.parent == out / "decoupled":
            continue  # X' pixels are what the user asked for; their metadata is checked below
        leaks[str(path.relative_to(tmp_path))] = scan(path.read_bytes(), needles)
    assert {where: found for where, found in leaks.items() if found} == {}

    with safe_open(str(out / "person.safetensors"), framework="pt") as f:
        header = json.dumps(f.metadata())
    assert all(key.startswith(("iddm.", "ss_")) for key in json.loads(header))
    for png in sorted((out / "decoupled").iterdir()):
        assert png.name.startswith("decoupled_") and scan(png.name.encode(), needles) == []
        image = Image.open(png)
        assert image.info == {} or set(image.info) <= {"dpi"}  # no text chunks, no EXIF, no ICC
        assert set(png_chunk_types(png.read_bytes())) <= {b"IHDR", b"IDAT", b"IEND"}
