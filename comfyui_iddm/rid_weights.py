"""RID network files: ours (safetensors, settings in the header) and the authors' released ones.

Ours: the RIDNet state dict in a .safetensors file whose metadata records the architecture, the budget
and the training settings, nothing about the faces it was trained on. Written atomically.

The authors' (Guohanzhong/RID on GitHub; downloaded by hand from the Google Drive folder their README
links, e.g. ASDS-eps-12_255.bin): a torch.save'd state dict of their DiT at its default size
(ARCHITECTURES["published"]), read with torch.load(weights_only=True) or from a safetensors copy.
Its layout is checked key by key before use (the way faces/registry.py checks recognizers), then
mapped onto RIDNet: their blocks' adaLN modulation only ever sees a zero conditioning, so its bias
is the block's constant modulation and its weight, the timestep and class embedders are unused.
Their files do not record the budget; their names do (eps-12_255 = 12/255 in [-1,1] pixel units).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from . import atomic
from .config import PAPER_PIXEL_RANGE, PIXEL_RANGES, ConfigError
from .faces.weights import WeightFormatError, load_strict, read_state_dict
from .rid import ARCHITECTURES, RIDArchitecture, RIDNet, RIDSettings, sincos_positions

FORMAT = "comfyui-iddm-rid/1"
FORMAT_KEY = "rid.format"
SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# The authors' DiT keeps DiT's timestep and class embedders (1000 classes + the guidance row) and a
# fixed 32 x 32 position table (512 px / patch 16), though its forward uses none but the table.
PUBLISHED_ARCH = ARCHITECTURES["published"]
PUBLISHED_GRID, PUBLISHED_CLASSES, PUBLISHED_FREQUENCIES = 32, 1001, 256
ETA_IN_NAME = re.compile(r"eps-?(\d+(?:\.\d+)?)_255")


# --- ours ----------------------------------------------------------------------------------------
def rid_metadata(settings: RIDSettings, base_models: list[str], regulariser: str) -> dict[str, str]:
    """Settings only: no face names, paths, hashes or counts. base_models are kinds ('tiny', 'sd_v1'),
    never paths."""
    arch = ARCHITECTURES[settings.architecture]
    values = {**{f"rid.{k}": v for k, v in vars(arch).items()}, "rid.architecture": settings.architecture,
              "rid.eta": settings.eta, "rid.pixel_range": settings.pixel_range,
              "rid.resolution": settings.resolution, "rid.steps": settings.steps,
              "rid.batch_size": settings.batch_size, "rid.lr": settings.lr,
              "rid.weight_decay": settings.weight_decay, "rid.reg_weight": settings.reg_weight,
              "rid.timesteps": ",".join(map(str, settings.timesteps)), "rid.prompt": settings.prompt,
              "rid.seed": settings.seed, "rid.base_models": ",".join(base_models),
              "rid.regulariser": regulariser}
    return {FORMAT_KEY: FORMAT, **{k: str(v) for k, v in values.items()}}


def save_rid(path: Path, net: RIDNet, metadata: Mapping[str, str], overwrite: bool = False) -> None:
    atomic.check_writable(Path(path), overwrite, example="rid.safetensors")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
    atomic.write_with(Path(path), lambda tmp: save_file(state, str(tmp), metadata=dict(metadata)))


# --- loading either kind ---------------------------------------------------------------------------
def load_rid(path: Path | str, eta: float | None = None, pixel_range: str = PAPER_PIXEL_RANGE,
             device: str | torch.device = "cpu") -> RIDNet:
    """A RIDNet from our file or the authors'. eta (in pixel_range units) overrides the file's budget
    (the authors' inference script takes it too); their files need it unless their name carries it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"RID weights {path} do not exist; give the .safetensors file `iddm rid-train` "
                                "wrote, or the authors' released .bin (README: RID).")
    if path.suffix.lower() not in SUFFIXES:
        raise WeightFormatError(f"{path.name} is not a RID weight file ({', '.join(SUFFIXES)}).")
    if pixel_range not in PIXEL_RANGES:
        raise ConfigError(f"pixel_range={pixel_range!r} is not one of {sorted(PIXEL_RANGES)}.")
    metadata = _safetensors_metadata(path)
    budget = _budget(eta, pixel_range) if eta is not None else saved_budget(path, metadata)
    if metadata.get(FORMAT_KEY) == FORMAT:
        net = _load_ours(path, metadata, budget)
    elif budget is None:
        raise ConfigError(f"{path.name} does not record the budget it was trained for (the authors' files "
                          "do not, and this name does not say it). Give it: --eta 0.047 for a network "
                          "trained at 12/255 (their names read ASDS-eps-12_255.bin).")
    else:
        net = _load_published(path, budget)
    return net.to(device).eval().requires_grad_(False)


def saved_budget(path: Path | str, metadata: Mapping[str, str] | None = None) -> float | None:
    """The budget (eta in [0,1] units) a network was trained for: from our header, else from the
    authors' file name (their eps is in [-1,1] units: eps-12_255 = 12/255 there); None if unknown."""
    path = Path(path)
    metadata = _safetensors_metadata(path) if metadata is None else metadata
    if metadata.get(FORMAT_KEY) == FORMAT and "rid.eta" in metadata:
        try:
            return float(metadata["rid.eta"]) * PIXEL_RANGES[metadata.get("rid.pixel_range", PAPER_PIXEL_RANGE)]
        except (KeyError, ValueError):
            return None
    found = ETA_IN_NAME.search(path.name)
    return float(found.group(1)) / 255 * PIXEL_RANGES[PAPER_PIXEL_RANGE] if found else None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise WeightFormatError(f"{path.name} is not a readable safetensors file ({err}).") from None


def _load_ours(path: Path, metadata: dict[str, str], budget: float | None) -> RIDNet:
    try:
        arch = RIDArchitecture(int(metadata["rid.patch_size"]), int(metadata["rid.hidden_size"]),
                               int(metadata["rid.depth"]), int(metadata["rid.num_heads"]),
                               float(metadata["rid.mlp_ratio"]))
    except (KeyError, ValueError) as err:
        raise WeightFormatError(f"{path.name}: its RID header is incomplete ({err}); write it again with "
                                "`iddm rid-train`.") from None
    if budget is None:
        raise WeightFormatError(f"{path.name}: its RID header has no readable budget (rid.eta, "
                                "rid.pixel_range); give --eta, or write it again with `iddm rid-train`.")
    net = RIDNet(arch, budget)
    load_strict(net, read_state_dict(path), "RID network", path)
    return net


def _budget(eta: float, pixel_range: str) -> float:
    if not 0 < eta <= 1:
        raise ConfigError(f"eta={eta!r} is out of range; give a budget in (0, 1] ({pixel_range} pixel units).")
    return eta * PIXEL_RANGES[pixel_range]


def published_layout() -> dict[str, tuple[int, ...]]:
    """Every key of the authors' DiT state dict with its shape."""
    arch = PUBLISHED_ARCH
    h, p, mlp = arch.hidden_size, arch.patch_size, int(arch.hidden_size * arch.mlp_ratio)
    layout: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, PUBLISHED_GRID ** 2, h),
        "x_embedder.proj.weight": (h, 3, p, p), "x_embedder.proj.bias": (h,),
        "t_embedder.mlp.0.weight": (h, PUBLISHED_FREQUENCIES), "t_embedder.mlp.0.bias": (h,),
        "t_embedder.mlp.2.weight": (h, h), "t_embedder.mlp.2.bias": (h,),
        "y_embedder.embedding_table.weight": (PUBLISHED_CLASSES, h),
        "final_layer.linear.weight": (p * p * 3, h), "final_layer.linear.bias": (p * p * 3,),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h), "final_layer.adaLN_modulation.1.bias": (2 * h,),
    }
    for i in range(arch.depth):
        for name, shape in (("attn.qkv.weight", (3 * h, h)), ("attn.qkv.bias", (3 * h,)),
                            ("attn.proj.weight", (h, h)), ("attn.proj.bias", (h,)),
                            ("mlp.fc1.weight", (mlp, h)), ("mlp.fc1.bias", (mlp,)),
                            ("mlp.fc2.weight", (h, mlp)), ("mlp.fc2.bias", (h,)),
                            ("adaLN_modulation.1.weight", (6 * h, h)), ("adaLN_modulation.1.bias", (6 * h,))):
            layout[f"blocks.{i}.{name}"] = shape
    return layout


def check_published_layout(state: Mapping[str, Tensor], path: Path) -> None:
    """Every key present with its shape, nothing else; the position table the fixed sin-cos one."""
    layout = published_layout()
    missing = [k for k in layout if k not in state]
    unexpected = [k for k in state if k not in layout]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {layout[k]})" for k in layout
             if k in state and tuple(state[k].shape) != layout[k]]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("wrong shape", wrong)) if keys)
        raise WeightFormatError(
            f"{path.name} is not a RID network in the authors' published layout (their DiT: 512 px, patch "
            f"16, 14 blocks of width 1152) nor a file written by `iddm rid-train`. {detail}")
    table = sincos_positions(layout["pos_embed"][2], PUBLISHED_GRID, PUBLISHED_GRID)
    if not torch.allclose(state["pos_embed"].float().reshape(table.shape), table, atol=1e-4):
        raise WeightFormatError(f"{path.name}: pos_embed is not the authors' fixed sin-cos table, so this is "
                                "not one of their RID networks (or it was modified).")


def from_published(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The authors' keys -> RIDNet's (after check_published_layout)."""
    ours = {"patch_embed.weight": state["x_embedder.proj.weight"], "patch_embed.bias": state["x_embedder.proj.bias"],
            "final_linear.weight": state["final_layer.linear.weight"],
            "final_linear.bias": state["final_layer.linear.bias"],
            "final_modulation": state["final_layer.adaLN_modulation.1.bias"]}
    for i in range(PUBLISHED_ARCH.depth):
        for name in ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                     "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
            ours[f"blocks.{i}.{name}"] = state[f"blocks.{i}.{name}"]
        ours[f"blocks.{i}.modulation"] = state[f"blocks.{i}.adaLN_modulation.1.bias"]
    return {k: v.float() for k, v in ours.items()}


def _load_published(path: Path, budget: float) -> RIDNet:
    state = read_state_dict(path)  # refuses pickled objects (weights_only=True), unwraps "module."
    check_published_layout(state, path)
    net = RIDNet(PUBLISHED_ARCH, budget)
    load_strict(net, from_published(state), "RID network", path)
    return net

