"""FaceNet: facenet-pytorch's InceptionResnetV1 architecture (imported lazily), 160x160 input,
facenet-pytorch's fixed standardization (x*255 - 127.5) / 128. Accepts its vggface2 / casia-webface
state dicts (with or without the `logits` classifier, which is dropped: we use the embedding)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from torch import Tensor

from ..templates import FACENET_160
from ..weights import load_strict
from . import Recognizer

_MEAN = (127.5 / 255,) * 3
_STD = (128.0 / 255,) * 3


def build_facenet(state: Mapping[str, Tensor] | None = None, path: Path | None = None) -> Recognizer:
    try:
        from facenet_pytorch import InceptionResnetV1
    except ImportError as err:
        raise ImportError("the facenet recognizer needs facenet-pytorch's architecture: "
                          "pip install --no-deps facenet-pytorch  (always --no-deps: its declared "
                          f"requirements would replace your torch). Detail: {err}") from None
    net = InceptionResnetV1(pretrained=None, classify=False)
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}
        load_strict(net, state, "facenet", path or Path("<state dict>"))
    return Recognizer(net, "facenet", 160, FACENET_160, _MEAN, _STD)
