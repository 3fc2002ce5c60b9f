"""IDDM Save Public Image: images for publishing, with no prompt, workflow or any other metadata."""
from __future__ import annotations

from comfy_api.latest import io, ui

from .places import OPTION_SOURCES
from .schema import build_schema
from .spec import NodeSpec, Port

SAVE_PUBLIC_IMAGE = NodeSpec(
    node_id="IDDMSavePublicImage",
    display_name="IDDM Save Public Image",
    description=("Saves images for publishing with nothing but the pixels. The stock Save Image node "
                 "writes the whole graph into every PNG (your photo folder's name, the LoRA's name, "
                 "every prompt and setting), and anyone you send the file to can read it. This node "
                 "writes no prompt, no workflow, no text of any kind."),
    inputs=(
        Port("images", "IMAGE", "The images to publish."),
        Port("filename_prefix", "STRING", "Start of the file names in ComfyUI's output folder ('sub/name' "
             "saves into a subfolder). File names travel with the images: don't name the person.",
             "portrait"),
        Port("format", "COMBO", "png: lossless. jpeg / webp: smaller files at the quality below. None of "
             "them carries metadata.", "png", options=("png", "jpeg", "webp")),
        Port("quality", "INT", "JPEG / WebP quality (100 = best); not used for PNG.", 95, 1, 100, 1),
    ),
    outputs=(),
    output_node=True,
)


class IDDMSavePublicImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(SAVE_PUBLIC_IMAGE, OPTION_SOURCES)

    @classmethod
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
