"""The files APDM writes, and putting a protection onto a model.

- protect_weights lora: a kohya LoRA (lora_io), for ComfyUI's stock LoraLoader, A1111/Forge, diffusers.
- protect_weights unet: every UNet weight under diffusers' names in one .safetensors, which ComfyUI's
  Load Diffusion Model (models/diffusion_models/) and diffusers' UNet2DConditionModel read.
Both carry `apdm.<knob>` per setting, `apdm.version` and `apdm.figures` (aggregate numbers): never the
person's photos, names, paths or hashes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import Tensor

from .apdm import METADATA_PREFIX, APDMConfig, APDMResult
from .atomic import check_writable, write_bytes
from .config import ConfigError
from .lora_io import DOWN, UP, kohya_metadata, read_safetensors, save_lora, settings_metadata
from .ports import Denoiser, UNetWeights

FORM_TEXT = {
    "unet": "a UNet checkpoint (every UNet weight changed, the paper's choice): load it with ComfyUI's "
            "Load Diffusion Model from models/diffusion_models/, beside the base checkpoint's CLIP and VAE",
    "lora": "a kohya LoRA on the attention projections: load it with ComfyUI's LoraLoader (strength 1) "
            "on the base checkpoint",
}


def protection_metadata(config: APDMConfig, figures: dict[str, Any],
                        base_model_version: str | None = None) -> dict[str, str]:
    meta = settings_metadata(METADATA_PREFIX, config.to_dict(), figures)
    if config.protect_weights == "lora":
        meta.update(kohya_metadata(config.fine_tune_config(), base_model_version))
    return meta


def save_protection(path: Path, result: APDMResult, config: APDMConfig, base_model_version: str | None = None,
                    overwrite: bool = False) -> None:
    """Writes the protection atomically (nothing at `path` unless complete)."""
    meta = protection_metadata(config, result.figures, base_model_version)
    if result.form == "lora":
        save_lora(path, result.weights, meta, overwrite=overwrite)
        return
    check_writable(Path(path), overwrite)
    write_bytes(Path(path), save({k: v.contiguous() for k, v in result.weights.items()}, metadata=meta))


@dataclass
class Protection:
    form: str  # "lora" or "unet"
    state: dict[str, Tensor]
    settings: dict[str, Any] | None  # the apdm.* values (None: a file made elsewhere)


def load_protection(path: Path) -> Protection:
    """A protected model's file: a kohya LoRA, or a UNet's weights (diffusers names)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"protected model {path} does not exist; give the file `iddm immunize --out` wrote.")
    state, metadata = read_safetensors(path, "a protected model such as `iddm immunize --out` writes")
    form = "lora" if any(k.endswith((DOWN, UP)) for k in state) else "unet"
    return Protection(form, state, read_settings(metadata))


def read_settings(metadata: dict[str, str]) -> dict[str, Any] | None:
    if f"{METADATA_PREFIX}.version" not in metadata:
        return None
    text = {f.name for f in fields(APDMConfig) if f.type == "str"} | {"version"}
    settings = {}
    for key, raw in metadata.items():
        if key.startswith(METADATA_PREFIX + "."):
            name = key[len(METADATA_PREFIX) + 1:]
            settings[name] = raw if name in text else json.loads(raw)
    return settings


@torch.no_grad()
def apply_protection(denoiser: Denoiser, protection: Protection) -> None:
    """Makes the denoiser's base model the protected one; its LoRA starts fresh on top (where an
    attacker's personalization goes)."""
    if not isinstance(denoiser, UNetWeights):
        raise ConfigError("this model door cannot change the UNet's own weights; load the base model "
                          "with the CLI (diffusers door) to apply a protection.")
    if protection.form == "lora":
        denoiser.load_lora_state_dict(protection.state)
        denoiser.merge_lora()
        return
    parameters = denoiser.unet_parameters()
    missing = sorted(set(parameters) - set(protection.state))
    unknown = sorted(set(protection.state) - set(parameters))
    if missing or unknown:
        raise ConfigError(f"the protected UNet does not fit this base model: {len(missing)} missing weight(s) "
                          f"{missing[:3]}, {len(unknown)} unknown {unknown[:3]}; give the --base it was made from.")
    for name, p in parameters.items():
        value = protection.state[name]
        if value.shape != p.shape:
            raise ConfigError(f"the protected UNet's {name} is {tuple(value.shape)}, the base model's "
                              f"{tuple(p.shape)}; give the --base it was made from.")
        p.copy_(value.to(p.device, p.dtype))
