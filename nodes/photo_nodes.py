"""IDDM Load Private Photos and IDDM Split Reference / Protection."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from . import spec
from .convert import comfy_to_engine, engine_to_comfy, numbered_message, photo_report
from .places import OPTION_SOURCES, photo_folder
from .served import comfy_relative_errors, served_warning
from .schema import build_schema


def load_face_detector(choice: str):
    """None for 'none' (photos already face-centred), else the engine's detector on ComfyUI's device."""
    if choice == "none":
        return None
    import comfy.model_management as mm
    from comfyui_iddm.faces.detect import load_detector

    from .places import recognizer_dir
    return load_detector(choice, device=mm.get_torch_device(), weights_dir=recognizer_dir())


NOT_CONNECTED = object()


class IDDMLoadPrivatePhotos(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(spec.LOAD_PHOTOS, OPTION_SOURCES)

    @classmethod
    def validate_inputs(cls, folder: str, images=NOT_CONNECTED) -> bool | str:
        # When the graph is queued: a folder that cannot be read says why and how to add one,
        # unless images are connected instead (ComfyUI then passes images=None: the value of a
        # link is not known yet). None for folder: it comes from a link too.
        from comfyui_iddm.private_root import PrivatePathError
        if images is not NOT_CONNECTED or folder is None:
            return True
        try:
            photo_folder(folder)
        except PrivatePathError as error:
            return str(error)
        return True

    @classmethod
    @comfy_relative_errors
    def execute(cls, folder: str, resolution: int, face_detector: str, show_file_names: bool = False,
                images=None) -> io.NodeOutput:
        from comfyui_iddm.photos import PhotoError, load_photo_folder, photoset_from_images

        detector = load_face_detector(face_detector)
        warning = None
        if images is not None:
            photos = photoset_from_images(comfy_to_engine(images), resolution, detector)
        else:
            path = photo_folder(folder)
            warning = served_warning(path)
            if warning:
                logging.warning(f"[IDDM] {warning}")
            try:
                photos = load_photo_folder(path, resolution, detector)
            except PhotoError as error:  # ComfyUI keeps the message in /history and its log
                if show_file_names:
                    raise
                raise PhotoError(numbered_message(str(error), path, folder)) from None
        if len(photos) == 0:
            report = photo_report(0, photos.issues, show_file_names)
            raise ValueError("no usable photo: " + report.replace("\n", "; "))
        report = photo_report(len(photos), photos.issues, show_file_names)
        return io.NodeOutput(engine_to_comfy(photos.images), f"{warning}\n{report}" if warning else report)


class IDDMSplitReferenceProtection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(spec.SPLIT, OPTION_SOURCES)

    @classmethod
    @comfy_relative_errors
    def execute(cls, photos, reference_count: int, mode: str, seed: int) -> io.NodeOutput:
        from comfyui_iddm.photos import PhotoSet, split_photos

        images = comfy_to_engine(photos)
        n = images.shape[0]
        scores = face_scores(images) if mode == "best" else None
        photo_set = PhotoSet(images, torch.zeros(n, 5, 2), [str(i) for i in range(n)], scores)
        reference, protection = split_photos(photo_set, reference_count, mode, seed)
        return io.NodeOutput(engine_to_comfy(reference.images), engine_to_comfy(protection.images))


def face_scores(images: torch.Tensor) -> torch.Tensor:
    """Detector confidence x face size of the best face per image (0: no face), for 'best' splits."""
    detections = load_face_detector("auto").detect(images)
    return torch.tensor([max((f.score * f.size for f in faces), default=0.0) for faces in detections])


NODES = [IDDMLoadPrivatePhotos, IDDMSplitReferenceProtection]
