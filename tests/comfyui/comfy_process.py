"""What the scripts that drive the pack in-process under ComfyUI's Python share (equivalence_check.py,
half_precision_check.py): ComfyUI started with its own command-line flags, the pack loaded the way
ComfyUI loads it, a checkpoint loaded with ComfyUI's loader, a seeded LoRA, one JSON line out.

A script is run as `python SCRIPT ARGS... [-- COMFYUI FLAGS...]` with ComfyUI's checkout on
PYTHONPATH (comfyui_fixtures.run_comfy_script); `start_comfyui` must run before anything imports
comfy, since ComfyUI reads its flags when comfy.cli_args is first imported.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parents[2]


def start_comfyui() -> list[str]:
    """Parse `sys.argv` after `--` with ComfyUI's own parser (as main.py does), always on the CPU;
    returns the script's own arguments (before `--`)."""
    own, flags = sys.argv[1:], []
    if "--" in own:
        at = own.index("--")
        own, flags = own[:at], own[at + 1:]
    import comfy.options

    comfy.options.enable_args_parsing()
    program, sys.argv[:] = sys.argv[0], [sys.argv[0], "--cpu", *flags]
    import comfy.cli_args  # noqa: F401  (parses sys.argv now)

    sys.argv[:] = [program, *own]
    return own


def load_pack():
    """The pack's nodes/comfy_denoiser.py, imported through the pack's package as ComfyUI does."""
    spec = importlib.util.spec_from_file_location("iddm_pack", PACK / "__init__.py",
                                                  submodule_search_locations=[str(PACK)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["iddm_pack"] = module
    spec.loader.exec_module(module)
    from iddm_pack.nodes import comfy_denoiser
    return comfy_denoiser


def load_checkpoint(path: str):
    """(MODEL, CLIP, VAE) as Load Checkpoint gives them: ComfyUI's loader, under inference mode."""
    import torch
    import comfy.sd

    with torch.inference_mode():
        return comfy.sd.load_checkpoint_guess_config(path)[:3]


def seeded_lora(denoiser, seed: int, std: float = 0.05) -> dict:
    """A non-zero LoRA state of the denoiser's shapes (so every LoRA matrix gets a gradient)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {key: value if key.endswith(".alpha") else torch.randn(value.shape, generator=generator) * std
            for key, value in denoiser.lora_state_dict().items()}


def shared_state(model, vae, denoiser=None) -> dict:
    """What training may change on ComfyUI's shared modules and `release` must put back: the object-
    patched attributes (by identity), instance forwards (checkpointing), weight casting flags, and
    the LoRA wrappers of `denoiser`."""
    modules = [*model.model.modules(), *vae.first_stage_model.modules()]
    adapters = set(map(id, denoiser.lora.values())) if denoiser is not None else set()
    return {"manual_cast_dtype": str(model.model.manual_cast_dtype),
            "model_sampling": id(model.model.model_sampling),
            "instance_forwards": sum("forward" in vars(m) for m in modules),
            "cast_weights": sum(bool(getattr(m, "comfy_cast_weights", False)) for m in modules),
            "saved_cast_flags": sum(hasattr(m, "prev_comfy_cast_weights") for m in modules),
            "lora_wrappers": sum(id(f) in adapters for m in modules for f in getattr(m, "weight_function", []))}


def emit(result: dict) -> None:
    print(json.dumps(result))
