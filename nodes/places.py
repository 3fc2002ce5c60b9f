"""Where the pack finds things in a ComfyUI installation, and the combo lists built from them."""
from __future__ import annotations

import logging
from pathlib import Path

import folder_paths

from .served import served_folders
from .spec import LORA_FILES, PHOTO_FOLDERS, RECOGNIZER_CHOICES

RECOGNIZER_FOLDER = "facerecognition"
RECOGNIZER_EXTENSIONS = {".safetensors", ".onnx", ".dat", ".pth", ".pt"}


def register_model_folders() -> None:
    """models/facerecognition (recognizer weights) and models/insightface (InsightFace packs);
    extra_model_paths.yaml entries of the same name are kept."""
    for name in (RECOGNIZER_FOLDER, "insightface"):
        default = str(Path(folder_paths.models_dir) / name)
        if name in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, default)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], RECOGNIZER_EXTENSIONS)


def recognizer_dir() -> Path:
    return Path(folder_paths.get_folder_paths(RECOGNIZER_FOLDER)[0])


def loras_dir() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0])


NO_FOLDER_CHOICE = "(no photo folder"  # how the list's only entry starts while there is none


def photo_folder(name: str) -> Path:
    """A folder of photos by its name relative to the private-photos root (never a path, which
    would travel with every shared workflow and saved image)."""
    from comfyui_iddm.private_root import PrivatePathError, how_to_add_folder, private_root, resolve_private_folder
    if name.startswith(NO_FOLDER_CHOICE):
        raise PrivatePathError(f"no photo folder chosen: {how_to_add_folder(private_root())}")
    return resolve_private_folder(name, served=served_folders())


def no_photo_folder_choice(problem: str) -> str:
    """The one entry of the folder list while there is no photo folder to pick: says why or what to do."""
    return f"{NO_FOLDER_CHOICE}{problem})"


def _photo_folders() -> list[str]:
    from comfyui_iddm.private_root import ensure_default_root, list_private_folders, private_root
    try:
        root = private_root()
        if ensure_default_root(root):  # first use: made readable by this account only
            logging.info(f"[IDDM] private photos go in {root.described} (made now, readable by this "
                         "account only; ComfyUI does not serve it): one folder per person.")
        return list_private_folders(root.path) or [no_photo_folder_choice(f" yet: add one to {root.described}")]
    except ValueError as error:  # a misconfigured root: say so in the list and at run time
        logging.warning(f"[IDDM] private-photos root: {error}")
        return [no_photo_folder_choice(f": {error}")]


def _lora_files() -> list[str]:
    """Every LoRA ComfyUI lists, the IDDM-made ones first (what marks them in the list)."""
    from comfyui_iddm.lora_io import iddm_lora_names

    names = folder_paths.get_filename_list("loras")
    made = set()
    for root in folder_paths.get_folder_paths("loras"):
        made |= iddm_lora_names(root, names)
    return [n for n in names if n in made] + [n for n in names if n not in made]


def _recognizer_choices() -> list[str]:
    try:
        from comfyui_iddm.faces.registry import available_recognizers
        return ["auto", *available_recognizers(recognizer_dir())]
    except Exception as error:  # the list is a convenience; 'auto' still works at run time
        logging.info(f"[IDDM] recognizer list unavailable ({error}); offering 'auto' only.")
        return ["auto"]


OPTION_SOURCES = {PHOTO_FOLDERS: _photo_folders, LORA_FILES: _lora_files,
                  RECOGNIZER_CHOICES: _recognizer_choices}
