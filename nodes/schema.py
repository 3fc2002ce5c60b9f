"""Builds ComfyUI V3 schemas (comfy_api.latest.io) from the plain declarations in spec.py."""
from __future__ import annotations

from typing import Callable

from comfy_api.latest import io

from .spec import CATEGORY, IDDM_LORA, IDDM_OPTIONS, NodeSpec, Port

_SOCKETS = {
    "IMAGE": io.Image, "MODEL": io.Model, "CLIP": io.Clip, "VAE": io.Vae,
    IDDM_LORA: io.Custom(IDDM_LORA), IDDM_OPTIONS: io.Custom(IDDM_OPTIONS),
}


def build_schema(spec: NodeSpec, option_sources: dict[str, Callable[[], list[str]]]) -> io.Schema:
    return io.Schema(
        node_id=spec.node_id,
        display_name=spec.display_name,
        category=CATEGORY,
        description=spec.description,
        inputs=[_input(p, option_sources) for p in spec.inputs],
        outputs=[_output(p) for p in spec.outputs],
        hidden=[h for h, wanted in ((io.Hidden.unique_id, spec.hidden_unique_id),
                                    (io.Hidden.prompt, spec.hidden_prompt)) if wanted] or None,
        is_output_node=spec.output_node,
    )


def _input(p: Port, option_sources: dict[str, Callable[[], list[str]]]):
    common = dict(display_name=p.display_name, optional=p.optional, tooltip=p.tooltip)
    if p.type == "INT":
        return io.Int.Input(p.name, default=p.default, min=p.min, max=p.max, step=p.step,
                            control_after_generate=True if p.seed else None, **common)
    if p.type == "FLOAT":
        return io.Float.Input(p.name, default=p.default, min=p.min, max=p.max, step=p.step, **common)
    if p.type == "STRING":
        return io.String.Input(p.name, default=p.default, multiline=p.multiline, **common)
    if p.type == "BOOLEAN":
        return io.Boolean.Input(p.name, default=p.default, **common)
    if p.type == "COMBO":
        options = list(p.options) + (option_sources[p.options_from]() if p.options_from else [])
        default = p.default if p.default in options else (options[0] if options else None)
        return io.Combo.Input(p.name, options=options, default=default, **common)
    return _SOCKETS[p.type].Input(p.name, **common)


def _output(p: Port):
    kind = {"STRING": io.String, "FLOAT": io.Float, "INT": io.Int}.get(p.type) or _SOCKETS[p.type]
    # Output ids are left to ComfyUI (they must differ from input ids, e.g. MODEL in and out);
    # the name users see is the display name.
    return kind.Output(None, display_name=p.display_name or p.name, tooltip=p.tooltip)
