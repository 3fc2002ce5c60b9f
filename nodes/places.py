"""Where the pack finds things in a ComfyUI installation, and the combo lists built from them."""
from __future__ import annotations

import logging
from pathlib import Path

import folder_paths

from .served import served_folders
from .spec import LORA_FILES, PHOTO_FOLDERS, RECOGNIZER_CHOICES, RID_FOLDER, RID_NETWORKS

RECOGNIZER_FOLDER = "facerecognition"
RECOGNIZER_EXTENSIONS = {".safetensors", ".onnx", ".dat", ".pth", ".pt"}


def register_model_folders() -> None:
    """models/facerecognition (recognizer weights), models/insightface (InsightFace packs) and
    models/iddm_rid (RID networks); extra_model_paths.yaml entries of the same name are kept."""
    from comfyui_iddm.rid_weights import SUFFIXES as RID_EXTENSIONS

    for name, extensions in ((RECOGNIZER_FOLDER, RECOGNIZER_EXTENSIONS), ("insightface", RECOGNIZER_EXTENSIONS),
                             (RID_FOLDER, set(RID_EXTENSIONS))):
        default = str(Path(folder_paths.models_dir) / name)
        if name in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, default)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], extensions)


def recognizer_dir() -> Path:
    return Path(folder_paths.get_folder_paths(RECOGNIZER_FOLDER)[0])


def rid_network_path(name: str) -> Path:
    """A RID network by its name in the rid_weights list (a file in models/iddm_rid)."""
    found = folder_paths.get_full_path(RID_FOLDER, name)
    if found is None:
        raise FileNotFoundError(f"RID network {name} is not in models/{RID_FOLDER} (any more); put it back, "
                                "press R to refresh the lists and choose it in rid_weights again.")
    return Path(found)


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


def _rid_networks() -> list[str]:
    """The networks in models/iddm_rid (listed after spec's NO_RID_NETWORK entry)."""
    return folder_paths.get_filename_list(RID_FOLDER)


OPTION_SOURCES = {PHOTO_FOLDERS: _photo_folders, LORA_FILES: _lora_files,
                  RECOGNIZER_CHOICES: _recognizer_choices, RID_NETWORKS: _rid_networks}
