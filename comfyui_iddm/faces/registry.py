"""The face recognizers IDDM can use, where their weights are found, and how to build them.

Names are shared by the CLI, the nodes and the reports: irse50, ir152, mobilefacenet, facenet,
arcface (from an InsightFace pack), dlib_resnet (from the face-recognition-models package), and
"auto". What "auto" means depends on the role: to MEASURE (resolve_names) it is every recognizer
whose weights are present; as Stage II's SURROGATES (resolve_surrogates) it is the paper's surrogate
ensemble as far as its weights are present, else dlib's ResNet, and never ArcFace (the paper's
evaluator).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .templates import ARCFACE_112, FACENET_160
from .weights import ENV_WEIGHTS_DIR, MissingWeightError, find_weight, read_state_dict, resolve_weights_dir

Builder = Callable[[Path | None, "str | torch.device"], nn.Module]
MS1M_LICENCE = ("trained on MS-Celeb-1M: non-commercial research use only (the dataset's and "
                "InsightFace's terms)")


@dataclass(frozen=True)
class RecognizerSpec:
    name: str
    input_size: int
    template: Tensor | None  # crop pixels; None = defined by the module itself (dlib's chip)
    embedding_dim: int
    patterns: tuple[str, ...]  # weight file names, most specific first
    source: str  # where users usually get the weights
    licence: str
    builder: Builder  # (weights_dir, device) -> Recognizer module
    locate: Callable[[Path | None], Path | None]  # the weight file that would be used, or None
    from_state_dict: Callable[..., nn.Module] | None = None  # (state, path) -> module, if file-based

    def is_present(self, weights_dir: Path | None = None) -> bool:
        return self.locate(weights_dir) is not None

    def missing_error(self, weights_dir: Path | None) -> MissingWeightError:
        folder = resolve_weights_dir(weights_dir)
        return MissingWeightError(
            f"no weights for the {self.name} face recognizer: looked for {' / '.join(self.patterns)} "
            f"in {folder}. Put the file there (inside ComfyUI: models/facerecognition/; CLI: "
            f"--weights-dir DIR or ${ENV_WEIGHTS_DIR}). Users usually get it from {self.source}. "
            f"Licence: {self.licence}.")


def _weight_files(*stems: str) -> tuple[str, ...]:
    return tuple(f"{stem}*{ext}" for stem in stems for ext in (".safetensors", ".pth", ".pt"))


def _in_weights_dir(patterns: tuple[str, ...]) -> Callable[[Path | None], Path | None]:
    return lambda weights_dir: find_weight(patterns, [resolve_weights_dir(weights_dir)])


def _state_dict_builder(name: str) -> Builder:
    def builder(weights_dir: Path | None, device: str | torch.device) -> nn.Module:
        spec = RECOGNIZERS[name]
        path = spec.locate(weights_dir)
        if path is None:
            raise spec.missing_error(weights_dir)
        return spec.from_state_dict(read_state_dict(path), path).to(device)
    return builder


def _lazy(module: str, function: str) -> Callable[..., nn.Module]:
    # Heavy or optional architectures are imported only when that recognizer is used.
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module, __package__), function)(*args, **kwargs)
    return call


# --- InsightFace packs: <root>/insightface/models/<pack>/*.onnx (buffalo_l, antelopev2) -------

ARCFACE_FILES = ("w600k_r50.onnx", "glintr100.onnx")


def insightface_pack_dirs(weights_dir: Path | None) -> list[Path]:
    """Folders that may hold InsightFace packs: in or beside the weights folder (ComfyUI keeps them
    in models/insightface/models/<pack>/, a sibling of models/facerecognition/), and ~/.insightface."""
    root = resolve_weights_dir(weights_dir)
    bases = [root / "insightface" / "models", root.parent / "insightface" / "models",
             Path.home() / ".insightface" / "models"]
    packs = [root]
    for base in bases:
        if base.is_dir():
            packs += sorted(p for p in base.iterdir() if p.is_dir())
    return packs


def _locate_arcface(weights_dir: Path | None) -> Path | None:
    return find_weight(ARCFACE_FILES, insightface_pack_dirs(weights_dir))


def _build_arcface(weights_dir: Path | None, device: str | torch.device) -> nn.Module:
    path = _locate_arcface(weights_dir)
    if path is None:
        raise RECOGNIZERS["arcface"].missing_error(weights_dir)
    return _lazy(".nets.arcface_onnx", "build_arcface")(path).to(device)


# --- dlib's ResNet: weights ship on PyPI in face-recognition-models ----------------------------

DLIB_RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def _locate_dlib(weights_dir: Path | None) -> Path | None:
    # Located without importing the package (its __init__ needs pkg_resources).
    spec = importlib.util.find_spec("face_recognition_models")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "models" / DLIB_RESNET_FILE
        if path.is_file():
            return path
    return None


def _build_dlib(weights_dir: Path | None, device: str | torch.device) -> nn.Module:
    if _locate_dlib(weights_dir) is None:
        raise RECOGNIZERS["dlib_resnet"].missing_error(weights_dir)
    return _lazy(".nets.dlib_resnet", "build_dlib_resnet")(weights_dir, device).to(device)


def _spec(name: str, input_size: int, template: Tensor | None, dim: int, patterns: tuple[str, ...],
          source: str, licence: str, builder: Builder | None = None,
          locate: Callable[[Path | None], Path | None] | None = None,
          build: Callable[..., nn.Module] | None = None) -> RecognizerSpec:
    return RecognizerSpec(name, input_size, template, dim, patterns, source, licence,
                          builder or _state_dict_builder(name), locate or _in_weights_dir(patterns),
                          from_state_dict=build)


RECOGNIZERS: dict[str, RecognizerSpec] = {spec.name: spec for spec in (
    _spec("irse50", 112, ARCFACE_112, 512, _weight_files("irse50", "ir_se50", "model_ir_se50"),
          "the pretrained-model bundles of face-privacy papers (AMT-GAN, CLIP2Protect, DiffAM: "
          "irse50.pth), originally TreB1eN/InsightFace_Pytorch's model_ir_se50.pth", MS1M_LICENCE,
          build=_lazy(".nets.irse", "build_irse50")),
    _spec("ir152", 112, ARCFACE_112, 512, _weight_files("ir152", "ir_152"),
          "the pretrained-model bundles of face-privacy papers (AMT-GAN, CLIP2Protect, DiffAM: "
          "ir152.pth; the IR-152 of face.evoLVe)", MS1M_LICENCE,
          build=_lazy(".nets.irse", "build_ir152")),
    _spec("mobilefacenet", 112, ARCFACE_112, 128,
          _weight_files("mobilefacenet", "mobile_face", "model_mobilefacenet"),
          "foamliu/MobileFaceNet on GitHub (weights/mobilefacenet.pt, 128-d) or the face-privacy "
          "papers' bundles (mobile_face.pth, 512-d)", MS1M_LICENCE + "; foamliu's code is Apache-2.0",
          build=_lazy(".nets.mobilefacenet", "build_mobilefacenet")),
    _spec("facenet", 160, FACENET_160, 512, _weight_files("facenet", "20180402-114759-vggface2"),
          "timesler/facenet-pytorch's GitHub release (20180402-114759-vggface2.pt) or the "
          "face-privacy papers' bundles (facenet.pth)",
          "trained on VGGFace2: research use under the dataset's terms; facenet-pytorch code MIT",
          build=_lazy(".nets.facenet", "build_facenet")),
    _spec("arcface", 112, ARCFACE_112, 512, ARCFACE_FILES,
          "an InsightFace model pack: buffalo_l (w600k_r50.onnx) or antelopev2 (glintr100.onnx), "
          "unpacked to models/insightface/models/<pack>/ (needs: pip install onnx; "
          "pip install --no-deps onnx2torch)", "InsightFace pretrained models: non-commercial "
          "research use only", builder=_build_arcface, locate=_locate_arcface),
    _spec("dlib_resnet", 150, None, 128, (DLIB_RESNET_FILE,),
          "PyPI: pip install face-recognition-models dlib-bin",
          "dlib's model files are published by dlib's author for any use (CC0); "
          "face-recognition-models is MIT", builder=_build_dlib, locate=_locate_dlib),
)}

AUTO = "auto"
NONE = "none"  # recognizers=none: no surrogate (only valid when Stage II has no steps)
# The paper's surrogate ensemble (IR-SE50, IR152, MobileFaceNet, FaceNet). ArcFace is its held-out
# evaluator and is never picked automatically to be attacked.
PAPER_SURROGATES = ("irse50", "ir152", "mobilefacenet", "facenet")
FALLBACK_SURROGATE = "dlib_resnet"  # weights on PyPI: what auto attacks when none of the paper's is present


def available_recognizers(weights_dir: Path | None = None) -> list[str]:
    """Names of every recognizer whose weights are present, in registry order."""
    return [name for name, spec in RECOGNIZERS.items() if spec.is_present(weights_dir)]


def resolve_names(names: Sequence[str], weights_dir: Path | None = None) -> list[str]:
    """Expand "auto", check every name, drop repeats (order kept)."""
    resolved: list[str] = []
    for name in names:
        if name == AUTO:
            present = available_recognizers(weights_dir)
            if not present:
                raise MissingWeightError(
                    f"recognizers=auto found no face-recognizer weights (looked in "
                    f"{resolve_weights_dir(weights_dir)} and for installed packages). The quickest "
                    "start: pip install face-recognition-models dlib-bin (dlib_resnet, from PyPI); "
                    "or put e.g. mobilefacenet.pth in that folder.")
            resolved += present
        elif name in RECOGNIZERS:
            resolved.append(name)
        else:
            raise ValueError(f"unknown face recognizer {name!r}; choose from "
                             f"{', '.join(RECOGNIZERS)} or {AUTO}.")
    return list(dict.fromkeys(resolved))


# Fewer of the paper's surrogates than this, and dlib's ResNet joins them: attacked alone, MobileFaceNet
# was driven to a cosine of -0.8 while the held-out dlib did not move at all (README, Fidelity).
MIN_PAPER_ENSEMBLE = 2


def auto_surrogates(weights_dir: Path | None = None) -> list[str]:
    """What recognizers=auto attacks in Stage II: the paper's surrogates whose weights are present,
    joined by dlib's ResNet (if installed) when fewer than MIN_PAPER_ENSEMBLE of them are; else none.
    Never arcface."""
    present = available_recognizers(weights_dir)
    paper = [n for n in PAPER_SURROGATES if n in present]
    fallback = [n for n in (FALLBACK_SURROGATE,) if n in present]
    return paper if len(paper) >= MIN_PAPER_ENSEMBLE else paper + fallback


def resolve_surrogates(names: Sequence[str], weights_dir: Path | None = None) -> list[str]:
    """Stage II's surrogates from a config's `recognizers`: "auto" = auto_surrogates; "auto,NAME" =
    their union (NAME is added, never dropped); "none" = no surrogate. Unknown names are an error;
    an empty result is left to the caller (it matters only when Stage II has steps)."""
    if NONE in names:
        return []
    expanded: list[str] = []
    for name in names:
        expanded += auto_surrogates(weights_dir) if name == AUTO else [name]
    return resolve_names(expanded, weights_dir)


def load_recognizers(names: Sequence[str], weights_dir: Path | None = None,
                     device: str | torch.device = "cpu") -> list[nn.Module]:
    """Build the named recognizers (eval mode, frozen) on `device`."""
    return [RECOGNIZERS[name].builder(weights_dir, device) for name in resolve_names(names, weights_dir)]


def build_from_state_dict(name: str, state: Mapping[str, Tensor]) -> nn.Module:
    """Build a file-based recognizer from tensors in memory (tests, conversions)."""
    spec = RECOGNIZERS[name]
    if spec.from_state_dict is None:
        raise ValueError(f"{name} is not built from a state dict; use load_recognizers.")
    return spec.from_state_dict(state)
