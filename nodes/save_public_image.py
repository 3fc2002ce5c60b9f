"""IDDM Save Public Image: images for publishing, with no prompt, workflow or any other metadata."""
from __future__ import annotations

from comfy_api.latest import io, ui

from . import spec
from .served import comfy_relative_errors
from .places import OPTION_SOURCES
from .schema import build_schema


class IDDMSavePublicImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(spec.SAVE_PUBLIC_IMAGE, OPTION_SOURCES)

    @classmethod
    @comfy_relative_errors
    def execute(cls, images, filename_prefix: str, format: str, quality: int) -> io.NodeOutput:
        from pathlib import Path

        import folder_paths
        from comfyui_iddm.public_image import save_public_images

        folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), images[0].shape[1], images[0].shape[0])
        names = save_public_images(images, Path(folder), stem, counter, format, quality)
        return io.NodeOutput(ui=ui.SavedImages(
            [ui.SavedResult(name, subfolder, io.FolderType.output) for name in names]))


NODES = [IDDMSavePublicImage]
