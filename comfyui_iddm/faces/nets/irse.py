"""IR and IR-SE ResNets for 112x112 faces (ArcFace paper's "improved residual" units), in the key
layout of TreB1eN/InsightFace_Pytorch and face.evoLVe (input_layer.*, body.N.*, output_layer.*):
the face-privacy literature's irse50.pth (IR-SE 50) and ir152.pth (IR 152). Input RGB in [-1, 1].
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from torch import Tensor, nn

from ..templates import ARCFACE_112
from ..weights import load_strict
from . import SYMMETRIC, Recognizer

# Units per stage (channels 64, 128, 256, 512; each stage starts with a stride-2 unit).
_STAGE_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
_STAGE_CHANNELS = (64, 128, 256, 512)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.fc2(self.fc1(x.mean(dim=(2, 3), keepdim=True)).relu()).sigmoid()
        return x * weight


class _IRUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, squeeze_excite: bool) -> None:
        super().__init__()
        if cin == cout:
            self.shortcut_layer = nn.MaxPool2d(1, stride)  # identity, subsampled when stride 2
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                nn.BatchNorm2d(cout))
        layers = [nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.PReLU(cout),
                  nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
        if squeeze_excite:
            layers.append(_SqueezeExcite(cout))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(nn.Module):
    def __init__(self, depth: int, squeeze_excite: bool, affine_embedding_bn: bool = True) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                         nn.PReLU(64))
        units, cin = [], 64
        for cout, count in zip(_STAGE_CHANNELS, _STAGE_UNITS[depth]):
            for i in range(count):
                units.append(_IRUnit(cin, cout, 2 if i == 0 else 1, squeeze_excite))
                cin = cout
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(), nn.Flatten(),
                                          nn.Linear(512 * 7 * 7, 512),
                                          nn.BatchNorm1d(512, affine=affine_embedding_bn))

    def forward(self, x: Tensor) -> Tensor:
        return self.output_layer(self.body(self.input_layer(x)))


def build_ir(name: str, depth: int, squeeze_excite: bool, state: Mapping[str, Tensor] | None = None,
             path: Path | None = None) -> Recognizer:
    # Some IR-152 releases have a BatchNorm1d without weight/bias on the embedding.
    affine = state is None or "output_layer.4.weight" in state
    net = IRBackbone(depth, squeeze_excite, affine_embedding_bn=affine)
    if state is not None:
        load_strict(net, state, name, path or Path("<state dict>"))
    return Recognizer(net, name, 112, ARCFACE_112, *SYMMETRIC)


def build_irse50(state: Mapping[str, Tensor] | None = None, path: Path | None = None) -> Recognizer:
    return build_ir("irse50", 50, True, state, path)


def build_ir152(state: Mapping[str, Tensor] | None = None, path: Path | None = None) -> Recognizer:
    return build_ir("ir152", 152, False, state, path)
