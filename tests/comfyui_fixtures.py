"""A real ComfyUI for integration tests: the tiny SD1.5 checkpoint, the server, HTTP helpers.

Used only when $COMFYUI_PATH points at a ComfyUI checkout (CI has none; those tests skip).
$COMFYUI_PYTHON is the interpreter that has ComfyUI's requirements (default: this one).

The checkpoint is the smallest one ComfyUI detects as SD1.5 (DESIGN.md): model_channels=320,
context_dim=768, channel_mult=[1], one res block, and a full-size VAE and CLIP-L. It is built with
ComfyUI's own module classes (so every key the loader expects is present: a missing tensor would be
uninitialized memory) and filled with seeded random weights.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pytest

CHECKPOINT_NAME = "iddm_tiny_sd15.safetensors"
# Seconds one HTTP request may take: a CPU server busy training answers late on a loaded machine (a
# /history poll took over 30 s with the load near 6), and a late answer is not a failure.
HTTP_TIMEOUT = 120
REPO = Path(__file__).resolve().parents[1]

# Runs inside ComfyUI's interpreter with the checkout on sys.path; argv[1] = output file.
_BUILD_SCRIPT = r'''
import sys, math, torch
from safetensors.torch import save_file
import comfy.cli_args
comfy.cli_args.args.cpu = True  # build on the CPU whatever the machine has
import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.models.autoencoder import AutoencoderKL
from comfy.sd1_clip import SDClipModel

ops = comfy.ops.disable_weight_init
unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                 channel_mult=(1,), num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                 transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
                 legacy=False, use_linear_in_transformer=False, operations=ops)
ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
            "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
clip = SDClipModel()

generator = torch.Generator().manual_seed(0)
def fill(name, t):
    # Seeded random weights with sane scales: ComfyUI's ops skip initialisation.
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return t
    if t.ndim >= 2:
        fan_in = t[0].numel()
        std = 0.02 if "embedding" in name else 1.0 / math.sqrt(fan_in)
        return torch.randn(t.shape, generator=generator) * std
    if t.ndim == 1 and name.endswith("weight"):  # 1-D weights are norm scales
        return torch.ones(t.shape)
    if name.endswith("logit_scale"):
        return torch.tensor(math.log(100.0))
    return torch.zeros(t.shape)

state = {}
for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae),
                       ("cond_stage_model.", clip)):
    for name, tensor in module.state_dict().items():
        if name.endswith("position_ids"):
            state[prefix + name] = torch.arange(tensor.shape[-1])[None]
            continue
        state[prefix + name] = fill(name, tensor).to(torch.float16).contiguous()
# SD1.5's own linear schedule, as in the released checkpoints.
betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
save_file(state, sys.argv[1])
print(len(state), "tensors")
'''


def comfyui_path() -> Path | None:
    value = os.environ.get("COMFYUI_PATH")
    return Path(value) if value and (Path(value) / "main.py").is_file() else None


def comfyui_marks(purpose: str, slow: bool = True) -> list:
    """The marks of a test module that needs a real ComfyUI: skipped, saying how to enable it,
    unless $COMFYUI_PATH points at a checkout."""
    marks = [pytest.mark.comfyui, pytest.mark.skipif(
        comfyui_path() is None,
        reason=f"set COMFYUI_PATH to a ComfyUI checkout (and COMFYUI_PYTHON to its Python) to {purpose}")]
    return marks + [pytest.mark.slow] if slow else marks


def comfyui_python() -> str:
    return os.environ.get("COMFYUI_PYTHON", sys.executable)


def comfyui_version(root: Path) -> str:
    text = (root / "comfyui_version.py").read_text()
    version = text.split('__version__ = "')[1].split('"')[0]
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return f"{version} ({commit or 'unknown commit'})"


def ensure_tiny_checkpoint(root: Path) -> Path:
    """models/checkpoints/iddm_tiny_sd15.safetensors (built once, ~455 MB fp16)."""
    path = root / "models" / "checkpoints" / CHECKPOINT_NAME
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        subprocess.run([comfyui_python(), "-c", _BUILD_SCRIPT, str(tmp)], cwd=root, check=True,
                       env={**os.environ, "PYTHONPATH": str(root)})
        tmp.rename(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_comfy_script(script: Path, *args: str, flags: Sequence[str] = (), timeout: float = 1800) -> dict:
    """Run a script of tests/comfyui under ComfyUI's Python, started with ComfyUI's `flags` (see
    tests/comfyui/comfy_process.py); returns the JSON line it printed last."""
    result = subprocess.run([comfyui_python(), str(script), *map(str, args), "--", *flags],
                            cwd=comfyui_path(), capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONPATH": str(comfyui_path())})
    assert result.returncode == 0, f"{script.name} {' '.join(flags)}:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def linked_into_custom_nodes(root: Path, packs: Mapping[str, Path]) -> Iterator[None]:
    """Each pack linked as custom_nodes/<name> for the duration (a link already there to the same
    folder is kept; another copy of the pack there skips the test)."""
    made = []
    try:
        for name, folder in packs.items():
            link = root / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(folder, target_is_directory=True)
                made.append(link)
            elif link.resolve() != Path(folder).resolve():
                pytest.skip(f"{link} is another copy of {name}; link {folder} there to test it")
        yield
    finally:
        for link in made:
            link.unlink()


@contextlib.contextmanager
def pack_server(log_dir: Path, photos: str, lora_prefix: str, flags: Sequence[str] = (),
                packs: Mapping[str, Path] | None = None) -> Iterator["ComfyServer"]:
    """A running server with this checkout linked as custom_nodes/comfyui-iddm (and `packs`), the tiny
    checkpoint, face photos in <private root>/<photos> (a folder of the test, given to the server as
    $IDDM_PRIVATE_ROOT) and output/ and temp/ folders of its own; afterwards the LoRAs named
    <lora_prefix>* are removed and the links undone."""
    from comfyui_iddm.private_root import ENV_ROOT

    root, private_root = comfyui_path(), log_dir / "private_root"
    make_face_photos(private_root / photos)
    with linked_into_custom_nodes(root, {"comfyui-iddm": REPO, **(packs or {})}):
        ensure_tiny_checkpoint(root)
        server = ComfyServer(root, log_dir / "server.log", flags=flags, env={ENV_ROOT: str(private_root)})
        try:
            server.start()
            yield server
        finally:
            server.stop()
            for lora in loras(lora_prefix):
                lora.unlink()


class ComfyServer:
    """`python main.py --cpu --listen 127.0.0.1 --port P [flags]` in the background, with its log kept.
    Its output/ and temp/ folders are its own, beside the log (ComfyUI's own output/ stays as it was);
    `env`: variables to set for the server (None: unset)."""

    def __init__(self, root: Path, log_path: Path, port: int | None = None, flags: Sequence[str] = (),
                 env: Mapping[str, str | None] | None = None) -> None:
        self.root, self.log_path = root, log_path
        self.port = port or free_port()
        self.output_dir = log_path.parent / "output"
        self.temp_dir = log_path.parent / "temp"  # ComfyUI's --temp-directory D means D/temp
        self.flags = ["--output-directory", str(self.output_dir), "--temp-directory", str(log_path.parent),
                      *flags]
        self.env = {**os.environ, **{k: v for k, v in (env or {}).items() if v is not None}}
        for name in [k for k, v in (env or {}).items() if v is None]:
            self.env.pop(name, None)
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [comfyui_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", *self.flags], cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
            env=self.env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early; see {self.log_path}:\n{self.log()[-3000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=HTTP_TIMEOUT) as response:
            return json.loads(response.read())

    def fetch(self, route: str) -> tuple[int, bytes]:
        """GET `route` as sent (no normalisation of '..'): (status, body), errors included."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT)
        try:
            connection.request("GET", route)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def post(self, route: str, payload: dict | None = None):
        data = json.dumps(payload or {}).encode()
        request = urllib.request.Request(self.url + route, data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            raise AssertionError(f"POST {route} -> {error.code}: {error.read().decode()[:3000]}") from None
        return json.loads(body) if body else None

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": "iddm-tests"})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 900.0) -> dict:
        """The /history entry of a finished prompt (status completed or error)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(1)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def status_messages(entry: dict) -> list:
    return entry.get("status", {}).get("messages", [])


def loras(prefix: str) -> list[Path]:
    """The LoRA files in ComfyUI's models/loras whose names start with prefix."""
    return sorted((comfyui_path() / "models" / "loras").glob(prefix + "*"))


def execution_errors(entry: dict) -> list[dict]:
    return [m[1] for m in status_messages(entry) if m[0] == "execution_error"]


def absolute_paths_in(entry: dict, forbidden: Sequence[str]) -> list[str]:
    """The forbidden paths a /history entry holds, leaving out ComfyUI's traceback frames, which name
    the code files of every call (its own, the pack's) for any node's error."""
    text = re.sub(r'File \\"[^"]*?\.py\\", line', "File <code file>, line", json.dumps(entry))
    return [text[max(0, m.start() - 80): m.end() + 80] for path in forbidden
            for m in re.finditer(re.escape(json.dumps(path)[1:-1]), text)]


def run_graph(server: ComfyServer, graph: dict, timeout: float = 1500) -> dict:
    """Queue an API graph, wait, and return its /history entry; it must have succeeded."""
    entry = server.wait(server.queue(graph), timeout)
    assert entry["status"]["status_str"] == "success", json.dumps(execution_errors(entry))[:4000]
    return entry


def interrupt_after_first_iteration(server: ComfyServer, graph: dict, state_dir: Path) -> dict:
    """Queue a resumable training graph, press Cancel once its first iteration is saved in
    `state_dir`, and return the run's /history entry."""
    prompt_id = server.queue(graph)
    deadline = time.time() + 900
    while not list(state_dir.glob("iteration-0001")):
        assert time.time() < deadline, "the first iteration never finished"
        time.sleep(0.5)
    server.post("/interrupt")
    return server.wait(prompt_id, 600)


def make_face_photos(folder: Path, count: int = 6) -> list[Path]:
    """Separate portrait files cut from insightface's sample group photo (6 people): real faces for
    the detector and recognizers, named neutrally. Needs insightface's data files and MTCNN."""
    from comfyui_iddm.faces.detect import load_detector
    from comfyui_iddm.photos import pil_to_tensor
    from comfyui_iddm.samples import group_photo

    photo = group_photo()
    faces = load_detector("mtcnn").detect(pil_to_tensor(photo)[None])[0][:count]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, face in enumerate(sorted(faces, key=lambda f: f.box[0])):
        x1, y1, x2, y2 = face.box
        cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, 0.8 * max(x2 - x1, y2 - y1)
        crop = photo.crop((int(cx - half), int(cy - half), int(cx + half), int(cy + half)))
        path = folder / f"photo_{index}.jpg"
        crop.save(path, quality=95)
        paths.append(path)
    return paths


def tiny_run(api: dict, folder: str, lora_suffix: str) -> dict:
    """A shipped API workflow scaled down to a CPU run of a minute or two on the tiny checkpoint;
    LoRA names become iddm_test<suffix>_<node id>."""
    graph = json.loads(json.dumps(api))
    short = dict(pgd_steps=2, ft_steps=2, batch_size=1)
    has_options = any(node["class_type"] == "IDDMTrainOptions" for node in graph.values())
    for node_id, node in graph.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CHECKPOINT_NAME
        elif kind == "IDDMLoadPrivatePhotos":
            inputs.update(folder=folder, resolution=64)
        elif kind == "IDDMSplitReferenceProtection":
            inputs.update(reference_count=3)
        elif kind == "IDDMTrainOptions":
            inputs.update(short)
        elif kind == "IDDMTrain":
            # graphs without IDDM Train Options (pack 0.1's) give the settings to IDDM Train itself
            inputs.update(iterations=1, lora_name=f"iddm_test{lora_suffix}_{node_id}",
                          **({} if has_options else short))
        elif kind == "IDDMCloakPhotos":
            inputs.update(iterations=1, pgd_steps=2, ft_steps=1)
        elif kind == "IDDMAntiPersonalizeModel":
            inputs.update(iterations=1, ft_steps=1, protection_name=f"iddm_test{lora_suffix}_{node_id}")
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64, batch_size=2)
        elif kind == "KSampler":
            inputs.update(steps=2)
    return graph


def stock_lora_effect(server: ComfyServer, lora_name: str) -> float:
    """How much a LoRA file in models/loras changes an image through the stock LoraLoader (mean
    absolute difference, 8-bit pixel units, strength 1 against 0); every key of it must load."""
    log_before = len(server.log())
    without = generate_with_stock_lora_loader(server, lora_name, 0.0)
    with_lora = generate_with_stock_lora_loader(server, lora_name, 1.0)
    assert "lora key not loaded" not in server.log()[log_before:]
    return float(abs(with_lora - without).mean())


def generate_with_stock_lora_loader(server: ComfyServer, lora_name: str, strength: float):
    """One 64 px image from the tiny checkpoint through the stock LoraLoader at `strength`, as a
    float array of 8-bit pixel values (the preview, in the server's own temp folder)."""
    import numpy as np
    from PIL import Image

    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name,
                                                    "strength_model": strength, "strength_clip": strength}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks person", "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["2", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 1, "steps": 2, "cfg": 7.0,
                                                  "sampler_name": "euler", "scheduler": "normal",
                                                  "positive": ["3", 0], "negative": ["4", 0],
                                                  "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    image = run_graph(server, graph)["outputs"]["8"]["images"][0]
    return np.asarray(Image.open(server.temp_dir / image["subfolder"] / image["filename"]), dtype=np.float32)
