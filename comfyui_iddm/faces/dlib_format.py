"""Reader for networks saved with dlib's `serialize` (e.g. dlib_face_recognition_resnet_model_v1.dat).

Written from dlib's documented format (dlib/serialize.h, dlib/float_details.h, dlib/cuda/tensor.h,
dlib/dnn/core.h, layers.h, input.h, loss.h); it does not import dlib.

Primitives:
- integers: one control byte (low nibble = number of payload bytes, 0x80 = negative for signed
  types) followed by that many little-endian magnitude bytes;
- floats/doubles: two integers, mantissa and exponent, value = mantissa * 2**exponent
  (exponents 32000/32001/32002 mean +inf/-inf/nan);
- strings: an integer length, then the bytes; bools: the ASCII characters '1' or '0';
- tensors: int version 2, four integers (num_samples, k, nr, nc), then raw little-endian float32;
  alias tensors (views into a layer's parameter tensor): int version 1 and the four dims only.

A network is nested wrappers, outermost first: add_loss_layer (version, loss details, subnet),
add_layer (version, subnet, then its layer details and bookkeeping), add_tag_layer/add_skip_layer
(version 1, subnet; their tag ids are compile-time and are not stored). The innermost add_layer
holds the input layer instead of a subnet. So the file starts with a run of versions (one per
wrapper), then the input layer, then each add_layer's details from the input outward.

Supported: add_layer records of version 2 (dlib 19.x; version 1, from older dlib, would be
indistinguishable from a tag/skip record), the layer types of dlib's face-recognition ResNet,
and its metric loss. Anything else is a DlibFormatError naming what was found and where.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MARKER = "tag_or_skip"  # an add_tag_layer or add_skip_layer: both are stored as version 1 + subnet


class DlibFormatError(ValueError):
    """The file is not a dlib network this reader understands."""


@dataclass(frozen=True)
class DlibLayer:
    """One computational layer (or a tag/skip marker), in input-to-output order."""
    kind: str  # "input_rgb_image_sized", "con", "fc", "affine", "relu", "max_pool", "avg_pool", "add_prev", MARKER
    version: str  # the version string dlib wrote ("con_4", "affine_", ...); "" for markers
    attrs: dict = field(default_factory=dict)  # integers, floats and flags of the layer
    tensors: dict = field(default_factory=dict)  # name -> float32 ndarray in dlib's own layout


@dataclass(frozen=True)
class DlibNet:
    loss: str  # the loss layer's version string, e.g. "loss_metric_2"
    loss_attrs: dict
    layers: list[DlibLayer]  # input layer first


_FLOAT_SPECIAL = {32000: math.inf, 32001: -math.inf, 32002: math.nan}


class _Stream:
    def __init__(self, data: bytes, source: str):
        self.data = data
        self.pos = 0
        self.source = source

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"{self.source}: {what} (at byte {self.pos}); the file is damaged or "
                               "is not the dlib network expected here.")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"file ends early: wanted {n} more bytes")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def peek_byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail("file ends early")
        return self.data[self.pos]

    def integer(self, signed: bool = True) -> int:
        control = self.take(1)[0]
        size = control & 0x0F
        negative = bool(control & 0x80)
        if size == 0 or size > 8 or (control & 0x70) or (negative and not signed):
            raise self.fail(f"bad integer control byte 0x{control:02x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if negative else value

    def real(self) -> float:
        if self.peek_byte() & 0x70:
            raise self.fail("old ASCII float encoding (dlib before 2013) is not supported")
        mantissa = self.integer()
        exponent = self.integer()
        if exponent in _FLOAT_SPECIAL:
            return _FLOAT_SPECIAL[exponent]
        return math.ldexp(mantissa, exponent)

    def string(self, max_len: int = 256) -> str:
        n = self.integer(signed=False)
        if n > max_len:
            raise self.fail(f"implausible string length {n}")
        raw = self.take(n)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.fail("non-ASCII version string") from None

    def flag(self) -> bool:
        ch = self.take(1)
        if ch not in (b"0", b"1"):
            raise self.fail(f"bad bool byte {ch!r}")
        return ch == b"1"

    def dims(self) -> tuple[int, int, int, int]:
        shape = tuple(self.integer() for _ in range(4))
        if any(d < 0 for d in shape):
            raise self.fail(f"negative tensor dimension {shape}")
        return shape

    def tensor(self) -> np.ndarray:
        version = self.integer()
        if version != 2:
            raise self.fail(f"tensor record version {version}, expected 2")
        shape = self.dims()
        count = math.prod(shape)
        return np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32).reshape(shape)

    def alias(self) -> tuple[int, int, int, int]:
        version = self.integer()
        if version != 1:
            raise self.fail(f"alias tensor record version {version}, expected 1")
        return self.dims()


def _split_params(s: _Stream, params: np.ndarray, parts: list[tuple[str, tuple]]) -> dict:
    """Cut a layer's flat parameter tensor into its alias views (dlib stores them back to back)."""
    flat = params.reshape(-1)
    need = sum(math.prod(shape) for _, shape in parts)
    if need != flat.size:
        raise s.fail(f"parameter tensor has {flat.size} values, its views need {need}")
    out, start = {}, 0
    for name, shape in parts:
        n = math.prod(shape)
        out[name] = flat[start:start + n].reshape(shape).copy()
        start += n
    return out


def _multipliers(s: _Stream) -> dict:
    names = ("learning_rate_multiplier", "weight_decay_multiplier",
             "bias_learning_rate_multiplier", "bias_weight_decay_multiplier")
    return {n: s.real() for n in names}


def _con(s: _Stream, version: str) -> DlibLayer:
    if version not in ("con_4", "con_5", "con_6"):
        raise s.fail(f"unsupported convolution layer version {version!r}")
    params = s.tensor()
    attrs = {"num_filters": s.integer(), "nr": s.integer(), "nc": s.integer(),
             "stride_y": s.integer(), "stride_x": s.integer(),
             "padding_y": s.integer(), "padding_x": s.integer()}
    filters, biases = s.alias(), s.alias()
    attrs.update(_multipliers(s))
    attrs["use_bias"] = s.flag() if version in ("con_5", "con_6") else True
    attrs["use_relu"] = s.flag() if version == "con_6" else False
    parts = [("weight", filters)] + ([("bias", biases)] if math.prod(biases) else [])
    return DlibLayer("con", version, attrs, _split_params(s, params, parts))


def _fc(s: _Stream, version: str) -> DlibLayer:
    if version not in ("fc_2", "fc_3"):
        raise s.fail(f"unsupported fully connected layer version {version!r}")
    attrs = {"num_outputs": s.integer(), "num_inputs": s.integer()}
    params = s.tensor()
    weights, biases = s.alias(), s.alias()
    attrs["bias_mode"] = s.integer()  # 0 = has bias, 1 = no bias
    attrs.update(_multipliers(s))
    attrs["use_bias"] = s.flag() if version == "fc_3" else attrs["bias_mode"] == 0
    parts = [("weight", weights)] + ([("bias", biases)] if math.prod(biases) else [])
    return DlibLayer("fc", version, attrs, _split_params(s, params, parts))


def _affine(s: _Stream, version: str) -> DlibLayer:
    if version not in ("affine_", "affine_2"):
        raise s.fail(f"unsupported affine layer version {version!r} (batch-norm layers are "
                     "not supported; dlib converts them to affine when saving for inference)")
    params = s.tensor()
    gamma, beta = s.alias(), s.alias()
    attrs = {"mode": s.integer()}  # 0 = per-channel (convolution mode), 1 = per-element
    attrs["disabled"] = s.flag() if version == "affine_2" else False
    return DlibLayer("affine", version, attrs, _split_params(s, params, [("gamma", gamma), ("beta", beta)]))


def _pool(kind: str):
    def read(s: _Stream, version: str) -> DlibLayer:
        if version != f"{kind}_2":
            raise s.fail(f"unsupported {kind} layer version {version!r}")
        keys = ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")
        return DlibLayer(kind, version, {k: s.integer() for k in keys})
    return read


def _relu(s: _Stream, version: str) -> DlibLayer:
    if version not in ("relu_", "relu_2"):
        raise s.fail(f"unsupported relu layer version {version!r}")
    return DlibLayer("relu", version, {"disabled": s.flag() if version == "relu_2" else False})


def _add_prev(s: _Stream, version: str) -> DlibLayer:
    return DlibLayer("add_prev", version)


_LAYER_READERS = {"con_": _con, "fc_": _fc, "affine_": _affine, "max_pool_": _pool("max_pool"),
                  "avg_pool_": _pool("avg_pool"), "relu_": _relu, "add_prev_": _add_prev}


def _layer(s: _Stream) -> DlibLayer:
    version = s.string()
    for prefix, read in _LAYER_READERS.items():
        if version == prefix or (version.startswith(prefix) and version[len(prefix):].isdigit()):
            return read(s, version)
    raise s.fail(f"unsupported layer type {version!r}")


def _input_layer(s: _Stream) -> DlibLayer:
    version = s.string()
    if version not in ("input_rgb_image", "input_rgb_image_sized"):
        raise s.fail(f"unsupported input layer {version!r} (expected an RGB image input)")
    attrs = {"avg_red": s.real(), "avg_green": s.real(), "avg_blue": s.real()}
    if version == "input_rgb_image_sized":
        attrs["nr"], attrs["nc"] = s.integer(signed=False), s.integer(signed=False)
    return DlibLayer(version, version, attrs)


def _add_layer_trailer(s: _Stream, version: int, on_input: bool) -> None:
    """Training bookkeeping after each layer's details (flags, cached tensors): read and dropped."""
    for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, output/gradient disabled
        s.flag()
    s.tensor()  # x_grad
    s.tensor()  # cached_output
    if on_input:
        s.tensor()  # grad_final
        if version >= 3:
            s.integer()  # sample expansion factor
    elif version == 2:
        s.tensor()  # params_grad


def _loss(s: _Stream) -> tuple[str, dict]:
    version = s.string()
    if version == "loss_metric_2":
        return version, {"margin": s.real(), "dist_thresh": s.real()}
    if version == "loss_metric_":
        return version, {"margin": 0.1, "dist_thresh": 0.75}
    raise s.fail(f"unsupported loss layer {version!r} (expected dlib's metric loss)")


def parse_network(data: bytes, source: str = "dlib network") -> DlibNet:
    """Parse a serialized dlib metric-learning network into its layer sequence (input first)."""
    s = _Stream(data, source)
    if s.integer() != 1:
        raise s.fail("not a dlib network file: the loss layer record (version 1) is missing")
    loss, loss_attrs = _loss(s)

    # Wrapper versions, outermost first: 2 = add_layer, 1 = tag/skip; the innermost add_layer
    # (version 2 or 3) is the one followed directly by the input layer's name.
    wrappers: list[int] = []
    while not wrappers or not _next_is_input_name(s):
        version = s.integer()
        if version not in (1, 2, 3) or (version == 3 and not _next_is_input_name(s)):
            raise s.fail(f"unexpected layer wrapper version {version}")
        wrappers.append(version)
    if wrappers[-1] == 1:
        raise s.fail("the input layer is wrapped by a tag layer, which this reader does not support")

    layers = [_input_layer(s)]
    input_version = wrappers.pop()
    first = _layer(s)
    _add_layer_trailer(s, input_version, on_input=True)
    layers.append(first)
    for version in reversed(wrappers):
        if version == 1:
            layers.append(DlibLayer(MARKER, ""))
            continue
        if version != 2:
            raise s.fail(f"unexpected layer wrapper version {version}")
        layers.append(_layer(s))
        _add_layer_trailer(s, version, on_input=False)
    if s.pos != len(data):
        raise s.fail(f"{len(data) - s.pos} unread bytes after the network")
    return DlibNet(loss, loss_attrs, layers)


def _next_is_input_name(s: _Stream) -> bool:
    """True if the stream continues with the string 'input_rgb_image...' (peek, no consume)."""
    saved = s.pos
    try:
        return s.string().startswith("input_")
    except DlibFormatError:
        return False
    finally:
        s.pos = saved


def read_network(path: Path) -> DlibNet:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DlibFormatError(f"cannot read the dlib network file {path}: {e}") from e
    return parse_network(data, source=path.name)
