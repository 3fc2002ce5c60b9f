"""LoRA files: kohya-format keys, IDDM metadata, atomic safetensors I/O.

kohya keys (`lora_unet_<diffusers module path, . -> _>.lora_down.weight` / `.lora_up.weight` /
`.alpha`) are what ComfyUI, A1111/Forge and diffusers all load; peft's `lora_A/lora_B` keys are not
mapped by ComfyUI for attention layers. Both doors name, initialise and check their LoRA here. The metadata records the IDDM settings and aggregate
figures, never anything that identifies the photos.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from . import __version__
from .atomic import check_writable, write_bytes
from .config import IDDMConfig

KOHYA_PREFIX = "lora_unet_"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


class LoRAError(ValueError):
    """A LoRA state does not fit the model; the message says which module and what to do."""


def kohya_name(module_path: str) -> str:
    """`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0` ->
    `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0`."""
    return KOHYA_PREFIX + module_path.replace(".", "_")


def kaiming_uniform_down(rank: int, in_features: int, generator: torch.Generator) -> Tensor:
    """kohya's (and peft's default) LoRA initialisation, the one both doors use: lora_down ~
    Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); lora_up = 0, so training starts
    at the base model."""
    bound = 1.0 / math.sqrt(in_features)
    return torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator)


def match_lora(state: Mapping[str, Tensor], expected: Mapping[str, tuple[torch.Size, torch.Size]],
               lora_alpha: float) -> dict[str, tuple[Tensor, Tensor]]:
    """Checks a kohya state against a model's LoRA modules (kohya name -> shapes of down and up) and
    returns name -> (down, up). Every module must be present with its shapes, and no other key. A
    file alpha other than lora_alpha is folded into up, so the LoRA's effect is unchanged."""
    names = {key.rsplit(".", 2)[0] if key.endswith((DOWN, UP)) else key.rsplit(".", 1)[0]
             for key in state}
    unknown = sorted(names - set(expected))
    missing = sorted(set(expected) - names)
    if unknown or missing:
        raise LoRAError(f"the LoRA does not fit this model: {len(unknown)} unknown module(s) "
                        f"{unknown[:3]}, {len(missing)} missing module(s) {missing[:3]}; "
                        "was it trained on a different base model?")
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, shapes in expected.items():
        down, up = state.get(name + DOWN), state.get(name + UP)
        if down is None or up is None:
            raise LoRAError(f"{name} lacks {DOWN if down is None else UP}; the LoRA file is incomplete.")
        if (down.shape, up.shape) != tuple(shapes):
            raise LoRAError(f"LoRA weight for {name} has shapes {tuple(down.shape)} / {tuple(up.shape)}, "
                            f"this model expects {tuple(shapes[0])} / {tuple(shapes[1])}; set rank to the "
                            "file's rank (ss_network_dim in its metadata), or use a LoRA of this base model.")
        alpha = float(state[name + ALPHA]) if name + ALPHA in state else down.shape[0]
        out[name] = (down, up if alpha == lora_alpha else up * (alpha / lora_alpha))
    return out


def lora_metadata(config: IDDMConfig, figures: Mapping[str, Any], *,
                  base_model_version: str | None = None) -> dict[str, str]:
    """safetensors header: one `iddm.<knob>` per setting, `iddm.version`, `iddm.figures` (aggregate
    numbers only) and the kohya `ss_*` keys UIs show. Nothing that identifies the photos."""
    return {**settings_metadata("iddm", config.to_dict(), figures), **kohya_metadata(config, base_model_version)}


def settings_metadata(prefix: str, settings: Mapping[str, Any], figures: Mapping[str, Any]) -> dict[str, str]:
    """`<prefix>.<knob>` per setting, `<prefix>.version` and `<prefix>.figures` (aggregate numbers
    only, checked): what a file made by the pack records about how it was made."""
    _check_numbers_only(figures, "figures")
    meta = {f"{prefix}.{name}": _encode(value) for name, value in settings.items()}
    meta[f"{prefix}.version"] = __version__
    meta[f"{prefix}.figures"] = json.dumps(dict(figures), sort_keys=True)
    return meta


def kohya_metadata(config: IDDMConfig, base_model_version: str | None = None) -> dict[str, str]:
    """The kohya `ss_*` keys LoRA UIs show (network, rank, alpha, base model family); nothing else."""
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.rank),
            "ss_network_alpha": _encode(config.lora_alpha)}
    if base_model_version:
        meta["ss_base_model_version"] = base_model_version
    return meta


def read_iddm_settings(metadata: Mapping[str, str] | None) -> dict[str, Any] | None:
    """The parsed `iddm.*` values (key without the prefix; knobs, `version`, `figures`), or None if
    the file is not an IDDM LoRA."""
    if not metadata or "iddm.version" not in metadata:
        return None
    text_fields = {f.name for f in dataclasses.fields(IDDMConfig) if f.type == "str"} | {"version"}
    settings: dict[str, Any] = {}
    for key, raw in metadata.items():
        if key.startswith("iddm."):
            name = key[len("iddm."):]
            try:
                settings[name] = raw if name in text_fields else json.loads(raw)
            except json.JSONDecodeError:
                raise ValueError(f"LoRA metadata {key}={raw!r} is not valid JSON; the file's IDDM "
                                 "settings are damaged (re-export it with `iddm train`).") from None
    return settings


def iddm_lora_names(folder: str | Path, names: Iterable[str]) -> set[str]:
    """Which of these LoRA files (relative to `folder`) IDDM made: reads only each safetensors
    header's metadata, never the weights; unreadable files are simply not IDDM-made."""
    made = set()
    for name in names:
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(str(Path(folder) / name), framework="pt") as f:
                if "iddm.version" in (f.metadata() or {}):
                    made.add(name)
        except (SafetensorError, OSError):
            continue
    return made


def save_lora(path: str | Path, state: Mapping[str, Tensor], metadata: Mapping[str, str],
              overwrite: bool = False) -> None:
    """Write a kohya LoRA atomically; an existing file is refused unless overwrite."""
    path = Path(path)
    check_writable(path, overwrite)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    # Serialized in memory, written by Python: a full disk is an OSError the caller can report,
    # not a SafetensorError from inside the library.
    write_bytes(path, save(tensors, metadata=dict(metadata)))


def load_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(kohya state, metadata) of a LoRA .safetensors file; a clear ValueError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist.")
    state, metadata = read_safetensors(path, "a LoRA in kohya format such as `iddm train` writes")
    if not any(k.endswith((DOWN, UP)) for k in state):
        raise ValueError(f"{path} holds no LoRA weights (no *{DOWN} / *{UP} keys); expected a LoRA "
                         "in kohya format such as `iddm train` writes, not a checkpoint or embedding.")
    return state, metadata


def read_safetensors(path: Path, expected: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; a ValueError saying what was `expected` otherwise."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable .safetensors file ({error}); expected {expected}.") from None


def _encode(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _check_numbers_only(value: Any, where: str) -> None:
    """Figures are aggregates (numbers, lists/dicts of numbers): refusing text keeps photo names,
    paths and hashes out of the file."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_numbers_only(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_numbers_only(item, f"{where}[{i}]")
    elif value is not None and not isinstance(value, numbers.Number):
        raise ValueError(f"LoRA metadata {where}={value!r} is not a number; only aggregate numbers "
                         "may be stored (never photo names, paths or hashes).")
