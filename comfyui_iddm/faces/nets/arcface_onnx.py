"""ArcFace from an InsightFace model pack (buffalo_l's w600k_r50.onnx, antelopev2's glintr100.onnx),
converted to a differentiable torch module with onnx2torch (optional; imported lazily).

Input convention, as InsightFace's own ArcFaceONNX applies it: RGB, 112x112 aligned with the
ArcFace template, (x*255 - 127.5) / 127.5 - unless the graph starts with its own Sub and Mul nodes,
in which case it takes raw 0..255 pixels.
"""
from __future__ import annotations

from pathlib import Path

from ..templates import ARCFACE_112
from ..weights import WeightFormatError
from . import SYMMETRIC, Recognizer

RAW_PIXELS = ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))


def build_arcface(path: Path) -> Recognizer:
    try:
        import onnx
        from onnx2torch import convert
    except ImportError as err:
        raise ImportError("the arcface recognizer converts InsightFace's ONNX model to torch and needs "
                          "onnx and onnx2torch: pip install onnx && pip install --no-deps onnx2torch  "
                          "(--no-deps: its declared requirements could replace your torch). "
                          f"Detail: {err}") from None
    path = Path(path)
    try:
        model = onnx.load(str(path))
        net = convert(model)
    except Exception as err:  # onnx / onnx2torch raise many types for a bad or unsupported file
        raise WeightFormatError(f"{path.name} could not be converted to a torch ArcFace model: {err}. "
                                "Use w600k_r50.onnx (buffalo_l) or glintr100.onnx (antelopev2).") from None
    _check_input(model, path)
    return Recognizer(net, "arcface", 112, ARCFACE_112, *input_normalization(model))


def input_normalization(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """InsightFace's rule: Sub and Mul among the first nodes = the graph normalizes itself."""
    names = [node.name for node in model.graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return RAW_PIXELS if has_sub and has_mul else SYMMETRIC


def _check_input(model, path: Path) -> None:
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim] if inputs else []
    if len(dims) != 4 or dims[1] != 3 or dims[2:] != [112, 112]:
        raise WeightFormatError(f"{path.name} does not take 112x112 RGB faces (input shape {dims}); "
                                "it is not an InsightFace ArcFace recognition model.")
