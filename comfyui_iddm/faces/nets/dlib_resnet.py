"""dlib's face recognition ResNet (dlib_face_recognition_resnet_model_v1) as a differentiable module.

The network of dlib's examples/dnn_face_recognition_ex.cpp: 150x150 RGB input, a 7x7/2 conv stem,
max pooling, 14 residual blocks (32, 64, 128, 256, 256 filters; the first block of each of the
last four stages downsamples), global average pooling, a 128-d fully connected layer without
bias. Batch norm is frozen into per-channel affine layers. The weights come from the .dat file
that ships in the face-recognition-models package (read by faces/dlib_format.py, no dlib needed),
converted once into a safetensors cache in the user's model folder.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import atomic
from ..dlib_format import MARKER, DlibFormatError, DlibLayer, read_network
from ..weights import resolve_weights_dir
from . import Recognizer

log = logging.getLogger(__name__)

DLIB_FILE = "dlib_face_recognition_resnet_model_v1.dat"
CACHE_FILE = "dlib_resnet_v1.safetensors"
INPUT_SIZE = 150
# dlib feeds (pixel - channel mean) / 256 with pixels in 0..255; these means are stored in the file.
DLIB_MEAN_RGB = (122.782, 117.001, 104.298)

# Where the 5 MTCNN-style landmarks (left eye centre, right eye centre, nose tip, left and right
# mouth corner; "left" = image left; pixel centres at integer coordinates) land in dlib's 150-px
# face chip (dlib.get_face_chip with padding 0.25, placed by dlib's own 5-point shape predictor,
# whose points are eye corners and the base of the nose instead). Measured, not designed: on 14
# real faces (the 6 of insightface's t1.jpg and its Tom_Hanks_54745.png, each also mirrored), dlib's
# chip transform (get_face_chip_details -> get_mapping_to_chip) was applied to MTCNN's landmarks of
# the same face and the results averaged; per-point spread 5-14 px (head pose). Aligning with it
# and grid_sample gives embeddings with cosine ~0.98 to those of dlib's own chips.
TEMPLATE_150 = ((49.96, 45.09), (104.88, 44.04), (76.60, 83.74), (52.12, 106.75), (101.56, 106.03))

# The residual stages of the ResNet: (filters, blocks, whether the first block downsamples).
_STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


class _Affine(nn.Module):
    """dlib's affine_ layer in convolution mode: a frozen batch norm, y = gamma * x + beta."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma[:, None, None] + self.beta[:, None, None]


def _add_padded(a: Tensor, b: Tensor) -> Tensor:
    """dlib's add_prev: the sum over the larger shape, the smaller tensor zero-extended at the end
    (extra channels, bottom rows, right columns), as dlib's tt::add does."""
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

    def grow(t: Tensor) -> Tensor:
        c, h, w = t.shape[1:]
        return F.pad(t, (0, shape[2] - w, 0, shape[1] - h, 0, shape[0] - c))

    return grow(a) + grow(b)


class _Residual(nn.Module):
    """dlib's ares / ares_down: relu(block(x) + x), downsampling via a 3x3/2 conv and 2x2 avg pool."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.affine1 = _Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.affine2 = _Affine(cout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        skip = F.avg_pool2d(x, 2) if self.down else x
        return F.relu(_add_padded(y, skip))


@dataclass(frozen=True)
class _Expected:
    """One entry of the layer sequence this architecture expects from the dlib file."""
    kind: str
    attrs: dict
    target: nn.Module | None = None


def _conv_attrs(conv: nn.Conv2d) -> dict:
    return {"num_filters": conv.out_channels, "nr": conv.kernel_size[0], "nc": conv.kernel_size[1],
            "stride_y": conv.stride[0], "stride_x": conv.stride[1],
            "padding_y": conv.padding[0], "padding_x": conv.padding[1]}


def _pool_attrs(size: int, stride: int) -> dict:
    return {"nr": size, "nc": size, "stride_y": stride, "stride_x": stride,
            "padding_y": 0, "padding_x": 0}


class DlibFaceResNet(nn.Module):
    """The backbone: dlib-normalized input [B,3,150,150] -> dlib's raw 128-d face descriptor."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 7, stride=2)
        self.stem_affine = _Affine(32)
        blocks, cin = [], 32
        for cout, count, down in _STAGES:
            for i in range(count):
                blocks.append(_Residual(cin, cout, down and i == 0))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, 128, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.stem_affine(self.stem(x))), 3, stride=2)
        return self.fc(self.blocks(x).mean(dim=(2, 3)))

    def expected_layers(self) -> list[_Expected]:
        """The layer sequence (input first) dlib's file must hold for this architecture."""
        plan = [_Expected("input_rgb_image_sized", {"nr": INPUT_SIZE, "nc": INPUT_SIZE}),
                _Expected("con", _conv_attrs(self.stem), self.stem),
                _Expected("affine", {"mode": 0}, self.stem_affine),
                _Expected("relu", {}), _Expected("max_pool", _pool_attrs(3, 2))]
        for block in self.blocks:
            plan += [_Expected(MARKER, {}),  # tag1
                     _Expected("con", _conv_attrs(block.conv1), block.conv1),
                     _Expected("affine", {"mode": 0}, block.affine1), _Expected("relu", {}),
                     _Expected("con", _conv_attrs(block.conv2), block.conv2),
                     _Expected("affine", {"mode": 0}, block.affine2)]
            if block.down:  # tag2, skip1 (back to tag1), avg_pool
                plan += [_Expected(MARKER, {}), _Expected(MARKER, {}),
                         _Expected("avg_pool", _pool_attrs(2, 2))]
            plan += [_Expected("add_prev", {}), _Expected("relu", {})]
        plan += [_Expected("avg_pool", _pool_attrs(0, 1)),  # avg_pool_everything
                 _Expected("fc", {"num_outputs": 128, "num_inputs": 256, "bias_mode": 1}, self.fc)]
        return plan


def load_dlib_layers(model: DlibFaceResNet, layers: list[DlibLayer], source: str) -> None:
    """Check the file's layer sequence against the architecture and copy its parameters in."""
    plan = model.expected_layers()
    if len(layers) != len(plan):
        raise DlibFormatError(f"{source}: {len(layers)} layers, the dlib face ResNet has {len(plan)}; "
                              "this is not dlib_face_recognition_resnet_model_v1.")
    for index, (got, want) in enumerate(zip(layers, plan)):
        wrong = {k: (got.attrs.get(k), v) for k, v in want.attrs.items() if got.attrs.get(k) != v}
        if got.kind != want.kind or wrong or got.attrs.get("disabled") or got.attrs.get("use_relu"):
            raise DlibFormatError(f"{source}: layer {index} is {got.kind} {got.attrs}, expected "
                                  f"{want.kind} {want.attrs}; this is not the dlib face ResNet.")
        _copy_parameters(got, want.target, f"{source}: layer {index} ({got.kind})")


def _copy_parameters(layer: DlibLayer, target: nn.Module | None, where: str) -> None:
    def put(param: Tensor, value: np.ndarray) -> None:
        if value.size != param.numel():
            raise DlibFormatError(f"{where}: {value.size} values where {param.numel()} are needed")
        with torch.no_grad():
            param.copy_(torch.from_numpy(value).reshape(param.shape))

    if layer.kind == "input_rgb_image_sized":
        means = tuple(layer.attrs[k] for k in ("avg_red", "avg_green", "avg_blue"))
        if not np.allclose(means, DLIB_MEAN_RGB, atol=1e-3):
            raise DlibFormatError(f"{where}: input channel means {means}, expected {DLIB_MEAN_RGB}")
    elif layer.kind == "con":
        put(target.weight, layer.tensors["weight"])
        put(target.bias, layer.tensors["bias"])
    elif layer.kind == "affine":
        put(target.gamma, layer.tensors["gamma"])
        put(target.beta, layer.tensors["beta"])
    elif layer.kind == "fc":  # dlib stores [inputs, outputs]; nn.Linear wants [outputs, inputs]
        put(target.weight, np.ascontiguousarray(layer.tensors["weight"].reshape(256, 128).T))


def dlib_model_file() -> Path:
    """The .dat file inside the installed face-recognition-models package."""
    # `import face_recognition_models` needs pkg_resources; find_spec only locates the folder.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the dlib_resnet face recognizer needs the face-recognition-models package "
            f"(it ships {DLIB_FILE}); install it with: pip install face-recognition-models dlib-bin")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "models" / DLIB_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"face-recognition-models is installed but {DLIB_FILE} is missing from it; "
                            "reinstall it: pip install --force-reinstall face-recognition-models")


def convert_dlib_file(path: Path) -> DlibFaceResNet:
    model = DlibFaceResNet()
    load_dlib_layers(model, read_network(path).layers, Path(path).name)
    return model


def _write_cache(model: DlibFaceResNet, cache: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_with(cache, lambda tmp: save_file(state, str(tmp), metadata={"source": DLIB_FILE}))
    except OSError as e:  # a read-only model folder must not stop recognition
        log.warning("could not cache the converted dlib_resnet weights at %s (%s); "
                    "they will be converted again next time", cache, e)


def build_dlib_resnet(weights_dir: Path | None = None, device: str | torch.device = "cpu") -> Recognizer:
    """dlib's face ResNet as a frozen Recognizer (aligned [B,3,150,150] RGB in [0,1] -> [B,128] unit
    vectors). Reads the safetensors cache in the weights folder (weights_dir, else $IDDM_WEIGHTS_DIR,
    else the per-user cache), creating it on first use from the .dat in face-recognition-models."""
    cache = resolve_weights_dir(weights_dir) / CACHE_FILE
    if cache.is_file():
        from safetensors.torch import load_file

        backbone = DlibFaceResNet()
        try:
            backbone.load_state_dict(load_file(str(cache)))
        except Exception as e:
            raise RuntimeError(f"the cached dlib_resnet weights {cache} could not be loaded ({e}); "
                               "delete that file and it will be converted again") from e
    else:
        backbone = convert_dlib_file(dlib_model_file())
        _write_cache(backbone, cache)
    # (pixel*255 - mean) / 256 == (pixel - mean/255) / (256/255)
    return Recognizer(backbone, "dlib_resnet", INPUT_SIZE, torch.tensor(TEMPLATE_150),
                      mean=[m / 255 for m in DLIB_MEAN_RGB], std=[256 / 255] * 3).to(device)
