"""What ComfyUI publishes over HTTP, so that private photos and this machine's paths stay out of it.

Anyone who can reach a ComfyUI server can download the files of its input/, output/ and temp/
folders (/view, listed at /internal/files), its user folder (/userdata), and list the files of every
model and custom_nodes folder (/models/<kind>). ComfyUI 0.3.64 also serves, as a "model preview",
any image the server process can read: GET /experiment/models/preview/<kind>/0/<../../path/name>
joins the name to the model folder unchecked (later ComfyUI versions confine it; the pack does the
same here until then). Every node error goes into /history and the log (/internal/logs), so the
nodes' errors name files as ComfyUI names them (comfy_relative_errors).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import folder_paths

from .convert import relative_names


def served_folders() -> list[tuple[str, Path]]:
    """(description, folder) of every folder ComfyUI publishes to anyone who can reach the server."""
    served = [(f"ComfyUI's {kind} folder (served at /view?type={kind})",
               Path(folder_paths.get_directory_by_type(kind))) for kind in ("input", "output", "temp")]
    served.append(("ComfyUI's user folder (served at /userdata)", Path(folder_paths.get_user_directory())))
    for kind, (paths, _) in folder_paths.folder_names_and_paths.items():
        served += [(f"ComfyUI's {kind} folder (its files listed at /models/{kind})", Path(p)) for p in paths]
    return served


def served_warning(folder: Path) -> str | None:
    """What Load Private Photos reports when the photos lie where ComfyUI serves them (a root the
    user pointed there on purpose): they are used, and the report says how to keep them private."""
    from comfyui_iddm.private_root import ENV_ROOT, default_private_root, served_by

    where = served_by(folder, served_folders())
    if where is None:
        return None
    return (f"Warning: these photos are in {where}, so anyone who can reach this server can download "
            f"them. Move them to a folder ComfyUI does not serve: {default_private_root().described} "
            f"(used when neither {ENV_ROOT} nor the settings file names a root), or another of your choice.")


def confine_model_previews() -> None:
    """Model previews only of files inside ComfyUI's model folders (what later ComfyUI versions
    check themselves), so the preview route cannot hand out the private photos."""
    try:
        from app.model_manager import ModelFileManager
    except ImportError:  # a ComfyUI without the route
        return
    original = ModelFileManager.get_model_previews
    if getattr(original, "confined_by_iddm", False):
        return

    def inside_model_folders(path: str) -> bool:
        real = Path(os.path.realpath(path))
        return any(real.is_relative_to(os.path.realpath(folder))
                   for paths, _ in folder_paths.folder_names_and_paths.values() for folder in paths)

    def get_model_previews(self, filepath: str):
        if not inside_model_folders(filepath):
            return []
        return [p for p in original(self, filepath) if not isinstance(p, str) or inside_model_folders(p)]

    get_model_previews.confined_by_iddm = True
    ModelFileManager.get_model_previews = get_model_previews


def comfy_names() -> list[tuple[str, str]]:
    """(absolute folder, how messages name it) for every folder of this installation an error may
    name: ComfyUI's own as ComfyUI names them (models/loras, input, ...), the private-photos root,
    IDDM's cache and the home folder by placeholder."""
    from comfyui_iddm.faces.weights import user_cache_dir
    from comfyui_iddm.private_root import private_root

    models = Path(folder_paths.models_dir)
    names = [(folder_paths.base_path, "ComfyUI"), (str(models), "models"),
             (folder_paths.get_user_directory(), "user")]
    names += [(folder_paths.get_directory_by_type(kind), kind) for kind in ("input", "output", "temp")]
    for kind, (paths, _) in folder_paths.folder_names_and_paths.items():
        names += [(p, f"<{kind} folder>") for p in paths if not Path(p).is_relative_to(models)]
    try:
        names.append((str(private_root().path), "<private-photos root>"))
    except ValueError:
        pass  # a misconfigured root: its messages name no path
    names += [(str(user_cache_dir().parent), "<IDDM cache>"), (str(Path.home()), "~")]
    return names


def comfy_relative_errors(execute):
    """A node's execute whose errors name files as ComfyUI names them (models/loras/x.safetensors)
    and the private root and home folder by placeholder: ComfyUI keeps every error message in
    /history and its log (/internal/logs), open to anyone who can reach the server."""
    @functools.wraps(execute)
    def wrapper(cls, *args, **kwargs):
        try:
            return execute(cls, *args, **kwargs)
        except Exception as error:
            message = str(error)
            relative = relative_names(message, comfy_names())
            if relative == message:
                raise
            raise _same_kind(error, relative) from None
    return wrapper


def _same_kind(error: Exception, message: str) -> Exception:
    try:
        renamed = type(error)(message)
        if str(renamed) == message:
            return renamed
    except Exception:  # an exception class that needs other arguments
        pass
    return RuntimeError(message)
