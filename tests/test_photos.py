"""Reading photos right: every common mode to upright 8-bit RGB, large photos scaled while decoding
(bounded memory), landmark geometry of the crops, duplicates, the several-faces rule, the split."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from comfyui_iddm import photos
from comfyui_iddm.faces.templates import ARCFACE_112
from comfyui_iddm.photos import (MAX_LOAD_SIDE, PhotoError, UnreadablePhoto, crop_faces, load_photo_folder,
                                 photoset_from_images, read_image, split_photos, square_crop)

from conftest import REPO_ROOT, synthetic_portrait, write_photos


def pixel(img: Image.Image, xy=(0, 0)) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(img)[xy[1], xy[0]])


# --- modes ---------------------------------------------------------------------------------------
def test_alpha_is_flattened_onto_white(tmp_path):
    rgba = Image.new("RGBA", (50, 40), (200, 10, 10, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 25, 40))  # left half fully transparent (blue underneath)
    rgba.save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.mode == "RGB" and pixel(img, (5, 5)) == (255, 255, 255) and pixel(img, (40, 5)) == (200, 10, 10)


def test_grey_with_alpha_and_palette_with_transparency(tmp_path):
    la = Image.new("LA", (40, 40), (90, 255))
    la.paste((0, 0), (0, 0, 20, 40))
    la.save(tmp_path / "la.png")
    assert pixel(read_image(tmp_path / "la.png"), (5, 5)) == (255, 255, 255)
    assert pixel(read_image(tmp_path / "la.png"), (30, 5)) == (90, 90, 90)
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.paste(0, (0, 0, 20, 40))
    pal.save(tmp_path / "p.png", transparency=0)
    img = read_image(tmp_path / "p.png")
    assert pixel(img, (5, 5)) == (255, 255, 255) and pixel(img, (30, 5)) == (10, 200, 30)


def test_grey_and_cmyk(tmp_path):
    Image.new("L", (40, 40), 77).save(tmp_path / "g.png")
    assert pixel(read_image(tmp_path / "g.png")) == (77, 77, 77)
    Image.new("RGB", (64, 64), (200, 60, 30)).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    assert np.abs(np.subtract(pixel(read_image(tmp_path / "c.jpg"), (32, 32)), (200, 60, 30))).max() <= 6


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    cv2 = pytest.importorskip("cv2")
    cv2.imwrite(str(tmp_path / "g16.png"), np.full((40, 40), 40000, np.uint16))
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    assert pixel(read_image(tmp_path / "g16.png")) == (156, 156, 156)  # 40000 / 65535 * 255; clipping gives 255
    bgr = np.zeros((40, 40, 3), np.uint16)
    bgr[..., 2], bgr[..., 1], bgr[..., 0] = 60000, 30000, 1000
    cv2.imwrite(str(tmp_path / "c16.png"), bgr)
    assert np.abs(np.subtract(pixel(read_image(tmp_path / "c16.png")), (233, 117, 4))).max() <= 1


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_give_their_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (40, 40), colour) for colour in ((220, 20, 20), (20, 220, 20), (20, 20, 220))]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    assert getattr(Image.open(path), "n_frames", 1) == 3
    r, g, b = pixel(read_image(path), (20, 20))
    assert r > 180 and g < 60 and b < 60


def test_exif_orientation_gives_the_upright_photo(tmp_path):
    upright = synthetic_portrait(48, seed=3).crop((0, 0, 48, 36))  # not square: rotations show
    # What a camera stores for each orientation tag, so that the viewer shows `upright`.
    stored = {1: upright, 2: upright.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
              3: upright.transpose(Image.Transpose.ROTATE_180), 4: upright.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
              5: upright.transpose(Image.Transpose.TRANSPOSE), 6: upright.transpose(Image.Transpose.ROTATE_90),
              7: upright.transpose(Image.Transpose.TRANSVERSE), 8: upright.transpose(Image.Transpose.ROTATE_270)}
    for orientation, image in stored.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.png"
        image.save(path, exif=exif)
        read = read_image(path)
        assert np.array_equal(np.asarray(read), np.asarray(upright)), orientation
        assert np.array_equal(np.asarray(read), np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")))


def test_a_png_named_jpg_is_read_by_its_content(tmp_path):
    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "x.jpg", format="PNG")
    assert pixel(read_image(tmp_path / "x.jpg")) == (1, 2, 3)


# --- size and memory -----------------------------------------------------------------------------
def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height, with no pixel data: reading it would fail, so a
    size refusal proves the size was checked before decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_a_huge_png_is_refused_before_decoding(tmp_path):
    _png_header_only(tmp_path / "huge.png", 12000, 9000)
    with pytest.raises(UnreadablePhoto, match=r"12000x9000 pixels is too large.*save it as JPEG or scale it down"):
        read_image(tmp_path / "huge.png")
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(UnreadablePhoto, match="far too large"):
        read_image(tmp_path / "bomb.png")


def test_large_photos_are_scaled_to_the_load_limit(tmp_path, monkeypatch):
    Image.new("RGB", (3000, 1000), (9, 99, 199)).save(tmp_path / "wide.png")
    monkeypatch.setattr(photos, "MAX_LOAD_SIDE", 1024)
    img = read_image(tmp_path / "wide.png")
    assert img.size == (1024, 341) and pixel(img, (500, 100)) == (9, 99, 199)


_MEASURE = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from PIL import JpegImagePlugin
import comfyui_iddm.photos as photos
from comfyui_iddm.photos import load_photo_folder, read_image
if sys.argv[3] == "no-draft":  # proves the measurement can fail: decode at full size
    JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size, scale=None: None
    photos.MAX_DECODE_PIXELS = 10**9
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
folder = Path(sys.argv[1])
read_image(folder / "small.jpg")  # warm up the decoder
Path("/proc/self/clear_refs").write_text("5")  # the kernel's high-water mark := current RSS
before = status_mb("VmRSS")
size = read_image(folder / "big.jpg").size
count = len(load_photo_folder(folder, 512))
print(json.dumps({"growth_mb": status_mb("VmHWM") - before, "size": size, "n": count}))
"""


def measure_reading(folder: Path, variant: str = "as-shipped") -> dict:
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(folder), str(REPO_ROOT), variant],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def big_jpeg_folder(tmp_path_factory) -> Path:
    """A 12000x9000 camera-sized JPEG (made in a child process, so this one stays small)."""
    folder = tmp_path_factory.mktemp("big")
    make = ("import sys; from PIL import Image, ImageDraw; im = Image.new('RGB', (12000, 9000), (120, 100, 90)); "
            "ImageDraw.Draw(im).ellipse([4500, 2000, 7500, 7000], fill=(220, 180, 160)); "
            "im.save(sys.argv[1] + '/big.jpg', quality=85); im.resize((300, 225)).save(sys.argv[1] + '/small.jpg')")
    subprocess.run([sys.executable, "-c", make, str(folder)], check=True)
    return folder


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures memory through /proc (Linux)")
def test_a_12000x9000_jpeg_is_scaled_while_decoding_with_bounded_memory(big_jpeg_folder):
    figures = measure_reading(big_jpeg_folder)
    assert max(figures["size"]) <= MAX_LOAD_SIDE and figures["n"] == 2
    # A full decode holds 12000*9000*4 bytes = 432 MB; decoding at 1/4 scale ~27 MB.
    assert figures["growth_mb"] < 120, figures
    print(f"peak RSS growth reading a 12000x9000 JPEG: {figures['growth_mb']:.0f} MB")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures memory through /proc (Linux)")
def test_the_memory_measurement_sees_a_full_decode(big_jpeg_folder):
    assert measure_reading(big_jpeg_folder, "no-draft")["growth_mb"] > 300


# --- crops and landmarks ---------------------------------------------------------------------------
@pytest.mark.parametrize("resolution", [32, 64, 512])
def test_crop_maps_landmarks_to_where_the_pixels_went(resolution):
    img = np.zeros((200, 300, 3), np.uint8)
    points = np.array([[140.0, 80.0], [170.0, 80.0], [155.0, 95.0], [143.0, 110.0], [167.0, 110.0]])
    for x, y in points.astype(int):
        img[y - 1:y + 2, x - 1:x + 2] = 255  # 3x3 dots centred on integer pixels
    crop, mapped = square_crop(Image.fromarray(img), (130, 60, 180, 120), points, resolution)
    arr = np.asarray(crop.convert("L"), dtype=np.float64)
    for (mx, my) in mapped:
        r = max(2, int(resolution / 60 * 3))
        y0, x0 = int(round(my)), int(round(mx))
        patch = arr[max(0, y0 - r):y0 + r + 1, max(0, x0 - r):x0 + r + 1]
        patch = np.where(patch > 0.2 * patch.max(), patch, 0)
        ys, xs = np.mgrid[max(0, y0 - r):y0 + r + 1, max(0, x0 - r):x0 + r + 1]
        centroid = (float((xs * patch).sum() / patch.sum()), float((ys * patch).sum() / patch.sum()))
        assert abs(centroid[0] - mx) < 0.3 and abs(centroid[1] - my) < 0.3, (centroid, (mx, my))


def test_without_a_detector_the_template_sits_in_the_middle():
    photo_set = crop_faces([(0, "p", Image.new("RGB", (224, 224)))], 224)
    assert torch.allclose(photo_set.landmarks[0], ARCFACE_112 + 56, atol=1e-4)


def _detector(*sides):
    faces = [SimpleNamespace(box=(10.0, 10.0, 10.0 + s, 10.0 + s), score=0.99,
                             landmarks=np.tile([[10.0 + s / 2, 10.0 + s / 2]], (5, 1)) + np.arange(10).reshape(5, 2))
             for s in sides]
    return SimpleNamespace(detect=lambda images: [faces])


@pytest.mark.parametrize("sides, kept, reason", [
    ((), 0, "no face found (skipped)"),
    ((120.0,), 1, None),
    ((120.0, 30.0), 1, "2 faces found; using the largest"),
    ((120.0, 100.0), 0, "2 faces of similar size; use photos of the person alone"),
    ((25.0,), 0, "the face is too small (25 px; need 40+ px"),
])
def test_which_face_is_used(sides, kept, reason):
    photo_set = crop_faces([(0, "me.jpg", Image.new("RGB", (300, 300)))], 64, _detector(*sides))
    assert len(photo_set) == kept
    if reason is None:
        assert photo_set.issues == []
    else:
        assert [i.name for i in photo_set.issues] == ["me.jpg"] and reason in photo_set.issues[0].reason


def test_duplicate_photos_are_kept_once(tmp_path):
    paths = write_photos(tmp_path, 3)
    (tmp_path / "z_copy.png").write_bytes(paths[1].read_bytes())
    photo_set = load_photo_folder(tmp_path, 64)
    assert photo_set.names == ["photo_00.png", "photo_01.png", "photo_02.png"]
    assert [(i.name, i.reason) for i in photo_set.issues] == [("z_copy.png", "the same photo as photo_01.png (skipped)")]


def test_images_in_memory_are_named_by_position():
    images = torch.rand(3, 3, 80, 80)
    images[1] = 0.5
    photo_set = photoset_from_images(images, 64, _detector())  # the detector finds no face anywhere
    assert len(photo_set) == 0 and [i.name for i in photo_set.issues] == ["image 0", "image 1", "image 2"]
    assert [i.index for i in photo_set.issues] == [0, 1, 2]


# --- split ---------------------------------------------------------------------------------------
def _set(n: int):
    return photos.PhotoSet(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 8, 8).clone(),
                           torch.zeros(n, 5, 2), [f"p{i}" for i in range(n)], torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0][:n]))


@pytest.mark.parametrize("mode", ["order", "random", "best"])
def test_split_is_disjoint_complete_and_deterministic(mode):
    ref, prot = split_photos(_set(5), 2, mode, seed=4)
    assert len(ref) == 2 and len(prot) == 3
    assert sorted(ref.names + prot.names) == [f"p{i}" for i in range(5)]
    assert split_photos(_set(5), 2, mode, seed=4)[0].names == ref.names
    if mode == "best":
        assert ref.names == ["p1", "p3"]


def test_split_errors_say_what_to_do():
    with pytest.raises(PhotoError, match=r"1 usable photo\(s\); IDDM needs at least 2.*Add photos"):
        split_photos(_set(1), 1)
    with pytest.raises(PhotoError, match="choose between 1 and 3"):
        split_photos(_set(4), 4)
    with pytest.raises(PhotoError, match="choose between 1 and 3"):
        split_photos(_set(4), 0)
    with pytest.raises(PhotoError, match="unknown"):
        split_photos(_set(4), 2, "alphabetical")
