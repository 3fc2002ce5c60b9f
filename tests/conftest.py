"""Shared test fixtures: a tiny face recognizer (no weights), synthetic photo folders, tiny configs.

Everything here is CPU-only, built in code and downloads nothing. Other test modules may use:

- `TinyRecognizer` / fixture `tiny_recognizer`: a seeded random conv net with the recognizer
  contract the face stack expects (name, input_size, template [5,2], forward(aligned [B,3,S,S] in
  [0,1]) -> unit vectors [B,D]). Use it wherever Stage II needs *a* recognizer but not a real one.
- `register_test_recognizer()` / fixture `test_recognizer`: puts that net into the face registry
  under TEST_RECOGNIZER, so `iddm train ... --recognizers tiny_test --evaluators tiny_test` runs
  in-process without weight files (the function form is for child processes).
- `write_photos(folder, count, ...)`: a folder of synthetic face-like portraits (distinct per
  photo), and `synthetic_photos(count, size)` for the same as a tensor.
- `tiny_config(**changes)`: the smallest sensible IDDMConfig (64 px, 1 iteration, few steps).
- `random_rid_network(path)`: a RID network file as `iddm rid-train` writes it, random weights.
- `insightface_t1()`: path of insightface's t1.jpg (six real faces), skips when not installed;
  fixture `mtcnn`: facenet-pytorch's MTCNN detector (real weights from its wheel), skips if absent.
- `train_argv(photos, out, *extra)`: fast `iddm train` arguments; `run_cli_here(argv)` runs
  them in-process -> (code, out, err); `files_under(folder)` lists what a run left behind.
- `png_chunk_types(data)`: the chunk types of a PNG file's bytes (e.g. [IHDR, IDAT, IEND] for pixels only).
- `run_cli(args, ...)`: `python -m comfyui_iddm.cli` in a child process with the test recognizer
  registered; returns the CompletedProcess (or the Popen with `wait=False`).

Torch runs single-threaded in tests (override with IDDM_TEST_THREADS): the models are tiny, and
on a busy 2-core machine torch's thread pool made a 64 px step 30x slower than one thread.
"""
from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_RECOGNIZER = "tiny_test"
THREADS = int(os.environ.get("IDDM_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)


# --- a recognizer without weights ----------------------------------------------------------------
class TinyRecognizer(nn.Module):
    """Seeded random conv net with the recognizer contract; its embedding depends on the face's
    pixels smoothly, so Stage II's gradient means something (it is not a real identity model)."""

    def __init__(self, name: str = TEST_RECOGNIZER, input_size: int = 32, dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        from comfyui_iddm.faces.templates import ARCFACE_112, scaled_template

        self.name, self.input_size = name, input_size
        self.register_buffer("template", scaled_template(ARCFACE_112, 112, input_size))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Tanh(),
                nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                nn.Linear(16 * (input_size // 4) ** 2, dim))
        self.requires_grad_(False).eval()

    def forward(self, aligned: Tensor) -> Tensor:
        return F.normalize(self.features(aligned * 2 - 1), dim=1)


@pytest.fixture
def tiny_recognizer() -> TinyRecognizer:
    return TinyRecognizer()


def register_test_recognizer(name: str = TEST_RECOGNIZER) -> Callable[[], None]:
    """Adds TinyRecognizer to the face registry as `name`; returns the function that removes it."""
    from comfyui_iddm.faces import registry

    spec = registry.RecognizerSpec(
        name=name, input_size=32, template=None, embedding_dim=32, patterns=(), source="tests/conftest.py",
        licence="test only", builder=lambda weights_dir, device: TinyRecognizer(name).to(device),
        locate=lambda weights_dir: Path(__file__))
    registry.RECOGNIZERS[name] = spec
    return lambda: registry.RECOGNIZERS.pop(name, None)


@pytest.fixture
def test_recognizer() -> str:
    undo = register_test_recognizer()
    yield TEST_RECOGNIZER
    undo()


@pytest.fixture
def place(tmp_path, test_recognizer):
    """photos/ (4 good synthetic portraits) and an empty out/; `lora` is out/person.safetensors."""
    class Place:
        photos = tmp_path / "photos"
        out = tmp_path / "out"
        lora = tmp_path / "out" / "person.safetensors"
    write_photos(Place.photos, 4)
    Place.out.mkdir()
    return Place


# --- synthetic photos ----------------------------------------------------------------------------
def synthetic_portrait(size: int, seed: int) -> Image.Image:
    """A face-like drawing centred in the frame (skin oval, eyes, nose, mouth, hair), colours and
    proportions varied by `seed` so no two photos are the same."""
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(40, 220, 3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    c, r = size / 2, size * (0.22 + 0.04 * rng.random())
    skin = tuple(int(v) for v in rng.integers(120, 240, 3))
    hair = tuple(int(v) for v in rng.integers(0, 90, 3))
    draw.ellipse([c - r * 1.05, c - r * 1.45, c + r * 1.05, c + r * 0.6], fill=hair)
    draw.ellipse([c - r * 0.85, c - r * 1.1, c + r * 0.85, c + r * 1.15], fill=skin)
    eye = max(1.0, r * 0.12)
    for dx in (-0.38, 0.38):
        draw.ellipse([c + dx * r - eye, c - 0.2 * r - eye, c + dx * r + eye, c - 0.2 * r + eye], fill=(20, 20, 30))
    draw.line([c, c - 0.1 * r, c - 0.05 * r, c + 0.25 * r], fill=(90, 60, 50), width=max(1, int(r * 0.05)))
    draw.arc([c - 0.35 * r, c + 0.3 * r, c + 0.35 * r, c + 0.6 * r], 10, 170, fill=(150, 40, 40),
             width=max(1, int(r * 0.06)))
    noise = rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def write_photos(folder: Path, count: int, size: int = 96, names: Sequence[str] | None = None,
                 seed: int = 0, fmt: str = "PNG") -> list[Path]:
    """`count` synthetic portraits in `folder` (created), named `names` or photo_<i>.<fmt>."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[fmt.upper()]
    names = list(names) if names is not None else [f"photo_{i:02d}{suffix}" for i in range(count)]
    paths = []
    for i, name in enumerate(names[:count]):
        path = folder / name
        synthetic_portrait(size, seed * 1000 + i).save(path, format=fmt)
        paths.append(path)
    return paths


def synthetic_photos(count: int, size: int = 64, seed: int = 0) -> Tensor:
    """[count,3,size,size] in [0,1]: the synthetic portraits as engine tensors."""
    arrays = [np.asarray(synthetic_portrait(size, seed * 1000 + i)) for i in range(count)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def centred_set(images: Tensor):
    """A PhotoSet of face-centred crops [N,3,S,S] with the canonical landmarks (no detector)."""
    from comfyui_iddm.photos import PhotoSet, centred_face

    side = images.shape[-1]
    landmarks = torch.as_tensor(centred_face((side, side)).landmarks, dtype=torch.float32)
    return PhotoSet(images, landmarks.expand(images.shape[0], 5, 2).clone(), [str(i) for i in range(len(images))])


def tiny_config(**changes):
    """The smallest sensible run: 64 px, 1 iteration, 2 fine-tune and 4 PGD steps (rho 0.5 = 2 + 2)."""
    from comfyui_iddm.config import IDDMConfig

    values = dict(resolution=64, iterations=1, ft_steps=2, pgd_steps=4, rho=0.5, batch_size=2, seed=0,
                  recognizers=TEST_RECOGNIZER)
    values.update(changes)
    return IDDMConfig(**values)


def random_rid_network(path: Path, eta: float = 0.05, resolution: int = 64) -> Path:
    """A RID network file as `iddm rid-train` writes it (the small architecture, header and all) with
    seeded random weights: the network's own initialisation, plus a random output layer (training
    starts that at zero, which would change no pixel)."""
    from comfyui_iddm.rid import RIDSettings
    from comfyui_iddm.rid_weights import rid_metadata, save_rid

    settings = RIDSettings(resolution=resolution, eta=eta)
    net = settings.build_net()
    nn.init.normal_(net.final_linear.weight, std=0.5, generator=torch.Generator().manual_seed(settings.seed))
    save_rid(path, net, rid_metadata(settings, ["tiny"], "none"))
    return path


# --- real faces from pip packages ------------------------------------------------------------------
def insightface_t1() -> Path:
    """insightface's t1.jpg (six clear faces of different people); skips the test when absent."""
    spec = importlib.util.find_spec("insightface")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / "images" / "t1.jpg"
        if path.is_file():
            return path
    pytest.skip("insightface's t1.jpg is not installed (pip install --no-deps insightface)")


@pytest.fixture(scope="session")
def mtcnn():
    try:
        from comfyui_iddm.faces.detect import MTCNNDetector
        return MTCNNDetector()
    except ImportError as err:
        pytest.skip(f"MTCNN unavailable: {err}")


# --- the CLI in a child process -------------------------------------------------------------------
_CHILD = ("import sys; sys.path.insert(0, {tests!r}); from conftest import register_test_recognizer; "
          "register_test_recognizer(); from comfyui_iddm.cli import main; sys.exit(main(sys.argv[1:]))")


def run_cli(args: Sequence[str], *, cwd: Path | None = None, wait: bool = True, timeout: float = 300,
            env: dict[str, str] | None = None):
    """`iddm ARGS` in a fresh interpreter (with the test recognizer registered)."""
    child_env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "IDDM_TEST_THREADS": str(THREADS),
                 "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    command = [sys.executable, "-c", _CHILD.format(tests=str(Path(__file__).parent)), *map(str, args)]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=child_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=child_env, capture_output=True, text=True, timeout=timeout)


# --- fast `iddm train` arguments ------------------------------------------------------------------
FAST_TRAIN_FLAGS = ("--base", "tiny", "--detector", "none", "--resolution", "64", "--iterations", "2",
                    "--ft-steps", "2", "--pgd-steps", "4", "--rho", "0.5", "--recognizers", TEST_RECOGNIZER,
                    "--evaluators", TEST_RECOGNIZER)


def train_argv(photos_dir: Path, out: Path, *extra: str) -> list[str]:
    """`iddm train` arguments for a seconds-long run on the tiny model and the test recognizer;
    `extra` flags come last, so they override the defaults."""
    return ["train", str(photos_dir), "--out", str(out), *FAST_TRAIN_FLAGS, *map(str, extra)]


def run_cli_here(argv: Sequence[str]) -> tuple[int, str, str]:
    """`iddm ARGV` in this process: (exit code, stdout, stderr); argparse's exits count too."""
    import contextlib
    import io

    from comfyui_iddm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def files_under(folder: Path) -> set[str]:
    """Every file and folder below `folder` (hidden ones included), as relative paths."""
    folder = Path(folder)
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def png_chunk_types(data: bytes) -> list[bytes]:
    """The types of a PNG's chunks in file order, private ones too (Image.info drops those), read and
    CRC-checked by Pillow's chunk reader; anything after IEND is read as chunks too (and fails)."""
    from PIL import PngImagePlugin

    file = io.BytesIO(data)
    assert file.read(8) == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks, types = PngImagePlugin.ChunkStream(file), []
    while file.tell() < len(data):
        kind, _, length = chunks.read()
        chunks.crc(kind, file.read(length))
        types.append(kind)
    return types


# --- Order and cleanliness of the tests against a real ComfyUI (tests/comfyui) -------------------
# Here, not in tests/comfyui/conftest.py: a second module named conftest would shadow this one for
# every `from conftest import ...`. Each real-ComfyUI module sets up what it needs and takes it down
# again (the pack linked into custom_nodes, photos in a private root of its own, a server with output/
# and temp/ folders of its own), so the modules pass alone and in any order: `--reverse-modules` runs
# them last module first. After each module, ComfyUI's own output/ and input/ hold what they held
# before (models/loras/ and custom_nodes/ are not watched: the modules use them while they run, and
# so may test runs of other checkouts at the same time; each module removes the LoRAs and links it made).
COMFYUI_TESTS = Path(__file__).resolve().parent / "comfyui"
WATCHED = ("output", "input")  # ComfyUI's folders no test writes to: each server has its own output


def pytest_addoption(parser):
    parser.addoption("--reverse-modules", action="store_true",
                     help="run the test modules in reverse order (each must make its own set-up)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse-modules"):
        modules = list(dict.fromkeys(item.path for item in items))
        items.sort(key=lambda item: -modules.index(item.path))  # stable: tests keep their order


def entries(folder: Path) -> set[str]:
    """Everything below `folder` (links not followed), as relative paths."""
    return {(Path(current) / name).relative_to(folder).as_posix()
            for current, dirs, files in os.walk(folder) for name in dirs + files}


@pytest.fixture(scope="module", autouse=True)
def comfyui_left_as_found(request):
    from comfyui_fixtures import comfyui_path

    root = comfyui_path() if COMFYUI_TESTS in request.node.path.parents else None
    if root is None:  # not a real-ComfyUI module, or the module skips
        yield
        return
    before = {name: entries(root / name) for name in WATCHED}
    yield
    left = {name: sorted(entries(root / name) - before[name]) for name in WATCHED}
    left = {name: paths for name, paths in left.items() if paths}
    assert not left, f"the module left files in ComfyUI's folders: {left}"
