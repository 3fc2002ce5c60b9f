"""Conversions at the door: ComfyUI values <-> engine values. Pure torch, testable without ComfyUI."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor


def comfy_to_engine(images: Tensor) -> Tensor:
    """ComfyUI IMAGE [B,H,W,C] float in [0,1] -> engine [B,3,H,W] float32.

    Cloned outside inference mode so the engine may take gradients through it (ComfyUI runs nodes
    under torch.inference_mode, which makes every tensor it hands over an inference tensor)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected a ComfyUI IMAGE batch [B,H,W,C], got shape {tuple(images.shape)}.")
    with torch.inference_mode(False):
        x = images[..., :3] if images.shape[-1] != 1 else images.expand(*images.shape[:3], 3)
        return x.permute(0, 3, 1, 2).to(torch.float32).clamp(0, 1).clone().contiguous()


def engine_to_comfy(images: Tensor) -> Tensor:
    """Engine [B,3,H,W] in [0,1] -> ComfyUI IMAGE [B,H,W,3] float32 on the CPU."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected engine images [B,3,H,W], got shape {tuple(images.shape)}.")
    return images.detach().to("cpu", torch.float32).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


@dataclass
class IddmLora:
    """What IDDM Train hands to Load Protected LoRA in the same graph (type IDDM_LORA)."""
    name: str  # file name in models/loras
    state: dict[str, Tensor]  # kohya keys
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def settings(self) -> dict[str, Any] | None:
        from comfyui_iddm.lora_io import read_iddm_settings
        return read_iddm_settings(self.metadata)

    def surrogates(self) -> tuple[str, ...]:
        """The recognizers Stage II attacked (an evaluation should use another one)."""
        settings = self.settings or {}
        measured = (settings.get("figures") or {}).get("identity") or {}
        if isinstance(measured, dict) and measured.get("surrogate"):
            return tuple(measured["surrogate"])  # the recognizers 'auto' resolved to
        return tuple(r for r in settings.get("recognizers") or () if r not in ("auto", "none"))


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]*$")


def lora_file_name(name: str) -> str:
    """A LoRA name typed into the node -> a file name inside models/loras (never a path)."""
    name = name.strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name or "/" in name or "\\" in name or ".." in name or not _SAFE_NAME.match(name):
        raise ValueError(f"lora_name {name!r} is not a plain file name; use letters, digits, '_', '-' "
                         "or '.', no folders (the LoRA is always written into models/loras).")
    return name + ".safetensors"


def rid_network_name(method: str, choice: str | None) -> str | None:
    """IDDM Cloak Photos' rid_weights -> the file name inside models/iddm_rid that `method` runs (None
    for the methods without a network). rid with none chosen is refused before any work, naming the
    folder as ComfyUI does (never an absolute path: node errors stay in /history)."""
    from comfyui_iddm.config import ConfigError

    from .spec import NO_RID_NETWORK, RID_FOLDER

    if method != "rid":
        return None
    if not choice or choice == NO_RID_NETWORK:
        raise ConfigError(f"method rid needs a RID network: put one in models/{RID_FOLDER} (the .safetensors "
                          "file `iddm rid-train` writes, or the authors' released .bin; README: RID), press R "
                          "to refresh the lists and choose it in rid_weights; or choose aspl, noise or none.")
    return choice


def photo_report(n_used: int, issues: Sequence[Any], show_names: bool = False) -> str:
    """The per-photo report ComfyUI keeps in its history: photo numbers and reasons, no file names
    (unless `show_names`, for local debugging)."""
    lines = [f"{n_used} photo(s) usable."]
    for issue in issues:
        if show_names:
            where = issue.name
        else:
            where = f"photo {issue.index + 1}" if issue.index is not None else "one file"
        lines.append(f"{where}: {issue.reason}")
    return "\n".join(lines)


def numbered_message(message: str, folder, name: str) -> str:
    """The engine's message with the folder's absolute path replaced by its relative name and every
    file name replaced by the photo's number (what the node's report uses)."""
    from comfyui_iddm.photos import PhotoError, list_photo_files

    message = message.replace(str(folder), name)
    try:
        files, others = list_photo_files(folder)
    except PhotoError:  # e.g. no images at all: the message names no file
        files, others = [], []
    names = [(path.name, f"photo {index + 1}") for index, path in enumerate(files)]
    names += [(issue.name, "one file") for issue in others]
    for file_name, label in sorted(names, key=lambda pair: -len(pair[0])):  # longest first
        message = message.replace(file_name, label)
    return message


def relative_names(text: str, names: Sequence[tuple[str, str]]) -> str:
    """`text` with each absolute folder of `names` ((folder, how to name it)) replaced by its name,
    the longest (most specific) folder first, so that /base/models/loras/x reads models/loras/x."""
    forms: dict[str, str] = {}
    for folder, name in names:
        for form in (str(folder), os.path.realpath(folder)):
            form = form.rstrip("/\\")
            if form:  # never the file-system root
                forms.setdefault(form, name)
    for folder in sorted(forms, key=len, reverse=True):
        # only whole folder names: /base does not match /base-2 or /base.old
        text = re.sub(re.escape(folder) + r"(?![\w-]|\.[\w-])", lambda _: forms[folder], text)
    return text


def figures_json(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=1, sort_keys=True, default=float)


def cloak_report(method: str, config, outcome) -> str:
    """What IDDM Cloak Photos reports (and ComfyUI keeps in its history): the method, the settings it reads,
    the budget in [0,1] units and the figures of the run (no names; an unchanged photo's PSNR is null)."""
    from comfyui_iddm.cloak import METHOD_KNOBS

    figures = {key: (None if isinstance(value, float) and math.isinf(value) else value)
               for key, value in outcome.figures.items()}
    return json.dumps({"method": method, "photos": int(outcome.cloaked.shape[0]),
                       "budget_0_1": round(config.budget[0], 5),
                       "settings": {name: getattr(config, name) for name in METHOD_KNOBS[method]},
                       "figures": figures, "seconds_per_photo": round(outcome.seconds_per_photo, 3)},
                      indent=1, sort_keys=True)
