"""MobileFaceNet (Chen et al. 2018) in the two published PyTorch layouts.

- "foamliu": foamliu/MobileFaceNet (128-d, ImageNet input normalization, ReLU6 blocks); the
  layout of ../shared/weights/mobilefacenet.safetensors. Keys: conv1.*, dw_conv.*, features.*, ...
- "insightface_pytorch": TreB1eN/InsightFace_Pytorch's MobileFaceNet (512-d, PReLU, x in [-1,1]);
  the face-privacy literature's mobile_face.pth. Keys: conv1.conv.*, conv_23.*, conv_6_dw.*, ...
Both are our own code written to those key layouts; a state dict is matched to one by its keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from torch import Tensor, nn

from ..templates import ARCFACE_112
from ..weights import WeightFormatError, load_strict
from . import IMAGENET, SYMMETRIC, Recognizer

# ----------------------------------------------------------------------------- foamliu layout


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class _DepthwiseSeparable(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.depthwise(x)).relu()
        return self.bn2(self.pointwise(x)).relu()


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(_conv_bn_relu6(cin, hidden, kernel=1),
                                  _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                                  nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class _GlobalDepthwise(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.depthwise(x))


# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 1.
_BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class MobileFaceNetFoamliu(nn.Module):
    embedding_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu6(3, 64, stride=2)
        self.dw_conv = _DepthwiseSeparable(64)
        blocks, cin = [], 64
        for t, c, n, s in _BOTTLENECKS:
            for i in range(n):
                blocks.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.features = nn.Sequential(*blocks)
        self.conv2 = _conv_bn_relu6(128, 512, kernel=1)
        self.gdconv = _GlobalDepthwise(512)
        self.conv3 = nn.Conv2d(512, 128, 1)
        self.bn = nn.BatchNorm2d(128)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.dw_conv(self.conv1(x)))
        return self.bn(self.conv3(self.gdconv(self.conv2(x)))).flatten(1)


# ------------------------------------------------------------------ InsightFace_Pytorch layout


class _ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, activation: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        if activation:
            self.prelu = nn.PReLU(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return self.prelu(x) if hasattr(self, "prelu") else x


class _DepthWise(nn.Module):
    def __init__(self, cin: int, cout: int, hidden: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.conv = _ConvBlock(cin, hidden)
        self.conv_dw = _ConvBlock(hidden, hidden, 3, stride, 1, groups=hidden)
        self.project = _ConvBlock(hidden, cout, activation=False)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.conv_dw(self.conv(x)))
        return x + out if self.residual else out


class _Residual(nn.Module):
    def __init__(self, channels: int, blocks: int, hidden: int) -> None:
        super().__init__()
        self.model = nn.Sequential(*(_DepthWise(channels, channels, hidden, 1, True) for _ in range(blocks)))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class MobileFaceNetInsightFacePytorch(nn.Module):
    def __init__(self, embedding_dim: int = 512) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.conv1 = _ConvBlock(3, 64, 3, 2, 1)
        self.conv2_dw = _ConvBlock(64, 64, 3, 1, 1, groups=64)
        self.conv_23 = _DepthWise(64, 64, 128, 2, False)
        self.conv_3 = _Residual(64, 4, 128)
        self.conv_34 = _DepthWise(64, 128, 256, 2, False)
        self.conv_4 = _Residual(128, 6, 256)
        self.conv_45 = _DepthWise(128, 128, 512, 2, False)
        self.conv_5 = _Residual(128, 2, 256)
        self.conv_6_sep = _ConvBlock(128, 512)
        self.conv_6_dw = _ConvBlock(512, 512, 7, groups=512, activation=False)
        self.linear = nn.Linear(512, embedding_dim, bias=False)
        self.bn = nn.BatchNorm1d(embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_23(self.conv2_dw(self.conv1(x)))
        x = self.conv_45(self.conv_4(self.conv_34(self.conv_3(x))))
        x = self.conv_6_dw(self.conv_6_sep(self.conv_5(x))).flatten(1)
        return self.bn(self.linear(x))


def build_mobilefacenet(state: Mapping[str, Tensor] | None = None, path: Path | None = None,
                        layout: str | None = None) -> Recognizer:
    """A MobileFaceNet recognizer; the layout is taken from the state dict's keys when given."""
    layout = layout or (detect_layout(state, path) if state is not None else "foamliu")
    if layout == "foamliu":
        net, norm = MobileFaceNetFoamliu(), IMAGENET
    elif layout == "insightface_pytorch":
        dim = state["linear.weight"].shape[0] if state is not None else 512
        net, norm = MobileFaceNetInsightFacePytorch(dim), SYMMETRIC
    else:
        raise ValueError(f"unknown MobileFaceNet layout {layout!r}")
    if state is not None:
        load_strict(net, state, "mobilefacenet", path or Path("<state dict>"))
    return Recognizer(net, "mobilefacenet", 112, ARCFACE_112, *norm)


def detect_layout(state: Mapping[str, Tensor], path: Path | None) -> str:
    if "dw_conv.depthwise.weight" in state:
        return "foamliu"
    if "conv_6_dw.conv.weight" in state:
        return "insightface_pytorch"
    name = path.name if path else "the state dict"
    raise WeightFormatError(f"{name} is not a MobileFaceNet checkpoint we know (expected the keys of "
                            "foamliu/MobileFaceNet or TreB1eN/InsightFace_Pytorch, e.g. "
                            "'dw_conv.depthwise.weight' or 'conv_6_dw.conv.weight').")
