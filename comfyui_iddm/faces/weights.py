"""Finding and reading face-recognizer weight files.

Search order: an explicit folder (the CLI's --weights-dir, ComfyUI's models/facerecognition/),
else $IDDM_WEIGHTS_DIR, else a per-user cache folder. Files are matched by name pattern.
Only safetensors or torch.load(weights_only=True) are used: a file that needs full unpickling is
refused, because unpickling runs arbitrary code.
"""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

ENV_WEIGHTS_DIR = "IDDM_WEIGHTS_DIR"


class MissingWeightError(FileNotFoundError):
    """A recognizer's weight file is not where we looked; the message says where to get it."""


class WeightFormatError(ValueError):
    """A weight file could not be read safely, or does not fit the recognizer's architecture."""


def user_cache_dir() -> Path:
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "comfyui-iddm" / "facerecognition"


def resolve_weights_dir(weights_dir: Path | str | None) -> Path:
    if weights_dir is not None:
        return Path(weights_dir).expanduser()
    if os.environ.get(ENV_WEIGHTS_DIR):
        return Path(os.environ[ENV_WEIGHTS_DIR]).expanduser()
    return user_cache_dir()


def find_weight(patterns: Iterable[str], folders: Iterable[Path]) -> Path | None:
    """First file (by pattern order, then name) matching one of `patterns` in `folders`."""
    folders = [f for f in folders if f.is_dir()]
    for pattern in patterns:
        for folder in folders:
            hits = sorted(p for p in folder.glob(pattern) if p.is_file())
            if hits:
                return hits[0]
    return None


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a weight file, unwrapped from the usual checkpoint containers."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise WeightFormatError(
                f"{path.name} holds pickled Python objects (not just tensors), and loading it would "
                "run code from the file, so it is refused. Convert it once, in an environment you "
                "trust, to a plain state dict: torch.save(model.state_dict(), 'new.pth') or "
                "safetensors.torch.save_file(model.state_dict(), 'new.safetensors')."
                f" (detail: {str(err).splitlines()[0]})") from None
    return _unwrap(state, path)


def _unwrap(state: object, path: Path) -> dict[str, Tensor]:
    # Training scripts save {"state_dict": ...}, {"model": ...} or a DataParallel "module." prefix.
    for key in ("state_dict", "model", "net", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightFormatError(f"{path.name} is not a state dict of tensors; save the model's "
                                "state_dict() (not the whole model) and try again.")
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def load_strict(module: nn.Module, state: Mapping[str, Tensor], recognizer: str, path: Path) -> None:
    """load_state_dict(strict=True) with an error that names the recognizer and the file."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:400]
        raise WeightFormatError(
            f"{path.name} does not fit the {recognizer} architecture (wrong network or a layout we "
            f"do not know). Check that the file is a {recognizer} checkpoint. Detail: {detail}") from None
