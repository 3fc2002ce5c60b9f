"""IDDM Train's settings beyond its own widgets (no ComfyUI imports: tested without ComfyUI).

They come from the optional IDDM Train Options node; without it, from its defaults. Graphs written
before that node existed give them to IDDM Train itself, as named inputs in API format, which
ComfyUI does not pass to a node that no longer declares them: IDDM Train reads them from the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from . import spec


@dataclass(frozen=True)
class TrainOptions:
    """What IDDM Train Options hands to IDDM Train: a value for every one of its settings."""
    values: Mapping[str, Any]

    def __post_init__(self) -> None:
        missing = set(spec.train_option_names()) - set(self.values)
        if missing:
            raise ValueError(f"IDDM Train Options is missing {sorted(missing)}")
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))


def default_options() -> dict[str, Any]:
    return {p.name: p.default for p in spec.TRAIN_OPTIONS.inputs}


def train_settings(options: TrainOptions | None, own_inputs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The defaults, then the connected IDDM Train Options, then settings given to IDDM Train itself
    by name (graphs of pack 0.1; in API format anyone may still do so: the node's own value wins)."""
    settings = default_options()
    if options is not None:
        settings.update(options.values)
    for port in spec.TRAIN_OPTIONS.inputs:
        if own_inputs and port.name in own_inputs:
            settings[port.name] = _checked(port, own_inputs[port.name])
    return settings


def own_inputs(prompt: Mapping[str, Any] | None, node_id: str | None) -> Mapping[str, Any]:
    """A node's inputs as written in the prompt (including ones it no longer declares)."""
    node = (prompt or {}).get(str(node_id)) or {}
    return node.get("inputs") or {}


def _checked(port: spec.Port, value: Any) -> Any:
    where = f"IDDM Train's input {port.name}={value!r}"
    if isinstance(value, list):  # [node id, output]: only declared inputs receive what a link carries
        raise ValueError(f"IDDM Train's input {port.name} is connected to another node; connect it to "
                         f"the {port.name} input of an IDDM Train Options node, and that node's output "
                         "to IDDM Train's 'options'.")
    expected = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}.get(port.type)
    if port.type == "COMBO":
        if value not in port.options:
            raise ValueError(f"{where} is not one of {list(port.options)}.")
    elif isinstance(value, bool) != (port.type == "BOOLEAN") or not isinstance(value, expected):
        raise ValueError(f"{where} is not {_kind(port.type)}.")
    return value


def _kind(port_type: str) -> str:
    return {"INT": "a whole number", "FLOAT": "a number", "STRING": "text",
            "BOOLEAN": "true or false"}[port_type]
