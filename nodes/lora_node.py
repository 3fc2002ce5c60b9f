"""IDDM Load Protected LoRA: the stock LoRA loader's job, plus the IDDM settings stored in the file."""
from __future__ import annotations

import json

from comfy_api.latest import io

from . import spec
from .served import comfy_relative_errors
from .places import OPTION_SOURCES
from .schema import build_schema


class IDDMLoadProtectedLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(spec.LOAD_LORA, OPTION_SOURCES)

    @classmethod
    def validate_inputs(cls, lora_name: str) -> bool | str:
        # Not the list check: a connected IDDM_LORA needs no file (its name may be the list entry that
        # says so, or "" as graphs of pack 0.1 hold); a missing file is named at run time.
        return True

    @classmethod
    @comfy_relative_errors
    def execute(cls, model, clip, lora_name: str, strength_model: float, strength_clip: float,
                lora=None) -> io.NodeOutput:
        import comfy.sd
        import folder_paths
        from comfyui_iddm.lora_io import load_lora, read_iddm_settings

        if lora is not None:
            state, metadata, name = lora.state, lora.metadata, lora.name
        else:
            if lora_name in ("", spec.CONNECTED_LORA):
                raise ValueError("no LoRA chosen: pick a file from models/loras in lora_name, or connect "
                                 "the 'lora' output of IDDM Train to the 'lora' input.")
            state, metadata = load_lora(folder_paths.get_full_path_or_raise("loras", lora_name))
            name = lora_name
        model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, state, strength_model, strength_clip)
        settings = read_iddm_settings(metadata)
        text = json.dumps({"lora": name, "iddm": settings} if settings else
                          {"lora": name, "iddm": None, "note": "not made by IDDM (no IDDM settings)"},
                          indent=1, sort_keys=True)
        return io.NodeOutput(model_out, clip_out, text, ui={"iddm_lora": [settings or {}]})


NODES = [IDDMLoadProtectedLoRA]
