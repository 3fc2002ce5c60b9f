"""Where the private photos live, named so that nothing shared ever carries a path.

Every value typed into a ComfyUI node travels with the workflows people share, is kept in the
server's /history, and is written into the metadata of each image the stock Save Image node saves.
So the photo folder is chosen by a name RELATIVE to a private-photos root that is configured once on
this machine. Absolute paths and `..` are refused. Messages never print the root's absolute path
either: they end up in /history and the server log, which others may read.

The default root is a per-user data folder outside ComfyUI (default_root): ComfyUI serves its input/,
output/ and temp/ folders (/view) and its user folder (/userdata) to anyone who can reach the server,
and lists the files of its model and custom_nodes folders (/models/...), so photos must live in none
of them. $IDDM_PRIVATE_ROOT or the settings file may point elsewhere; a root that ComfyUI serves is
still used (the user chose it) but reported (served_by).

LoRA file names travel the same way, so the default name is neutral: iddm_<YYYYMMDD>_<6 hex>.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path, PurePosixPath
from typing import Iterable, Mapping

ENV_ROOT = "IDDM_PRIVATE_ROOT"
SETTINGS_KEY = "private_root"
SETTINGS_NAME = "settings.json"
APP_DIR = "comfyui-iddm"
PHOTOS_DIR = "photos"
LIST_DEPTH = 3  # folder levels listed below the root (a root set to a large tree stays quick to list)

NEUTRAL_LORA = re.compile(r"iddm_\d{8}_[0-9a-f]{6}")
LORA_SUFFIX = ".safetensors"


class PrivatePathError(ValueError):
    """A folder name that would publish a path, or a root that is not set up; says what to do."""


@dataclass(frozen=True)
class PrivateRoot:
    path: Path
    described: str  # where it comes from, in words, without the absolute path
    is_default: bool = False


def settings_file(environ: Mapping[str, str] | None = None) -> Path:
    """<user config dir>/comfyui-iddm/settings.json (XDG on Linux, Application Support on macOS,
    %APPDATA% on Windows)."""
    env = os.environ if environ is None else environ
    if sys.platform == "win32" and env.get("APPDATA"):
        base = Path(env["APPDATA"])
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / APP_DIR / SETTINGS_NAME


def shown(path: Path) -> str:
    """A path for messages, with the home folder as ~ (the account name stays out of logs)."""
    try:
        return "~/" + Path(path).relative_to(Path.home()).as_posix()
    except ValueError:
        return str(path)


def configured_root(environ: Mapping[str, str] | None = None,
                    settings: Path | None = None) -> PrivateRoot | None:
    """The root the user set up: $IDDM_PRIVATE_ROOT first, then "private_root" in the settings file."""
    env = os.environ if environ is None else environ
    settings = settings if settings is not None else settings_file(env)
    if env.get(ENV_ROOT):
        return _checked_root(env[ENV_ROOT], f"the folder set in ${ENV_ROOT}")
    if settings.is_file():
        try:
            value = json.loads(settings.read_text(encoding="utf-8")).get(SETTINGS_KEY)
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as error:
            raise PrivatePathError(f"{shown(settings)} is not a JSON object ({error}); write it as "
                                   f'{{"{SETTINGS_KEY}": "/folder/that/holds/your/photo/folders"}}.') from None
        if value:
            return _checked_root(str(value), f'the folder set as "{SETTINGS_KEY}" in {shown(settings)}')
    return None


def _checked_root(value: str, described: str) -> PrivateRoot:
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise PrivatePathError(f"{described} must be an absolute path (it is only stored on this machine); "
                               f"got a relative one.")
    if not path.is_dir():
        raise PrivatePathError(f"{described} does not exist or is not a folder; create it or fix the setting.")
    return PrivateRoot(path, described)


def default_root(environ: Mapping[str, str] | None = None) -> Path:
    """<user data dir>/comfyui-iddm/photos: $XDG_DATA_HOME (~/.local/share) on Linux, Application
    Support on macOS, %LOCALAPPDATA% on Windows (local, not roaming: photos stay on this machine)."""
    env = os.environ if environ is None else environ
    return _data_base(env) / APP_DIR / PHOTOS_DIR


def _data_base(env: Mapping[str, str]) -> Path:
    if sys.platform == "win32":
        return Path(env["LOCALAPPDATA"]) if env.get("LOCALAPPDATA") else Path.home() / "AppData" / "Local"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support"
    return Path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME") else Path.home() / ".local" / "share"


def _default_where(path: Path) -> str:
    """The default root in words that hold no account name: ~/... or the variable it comes from."""
    where = shown(path)
    if where.startswith("~/"):
        return where
    if sys.platform == "win32":
        return rf"%LOCALAPPDATA%\{APP_DIR}\{PHOTOS_DIR}"
    return f"$XDG_DATA_HOME/{APP_DIR}/{PHOTOS_DIR}"


def default_private_root(environ: Mapping[str, str] | None = None) -> PrivateRoot:
    """The root used when none is configured (it may not exist yet: ensure_default_root)."""
    path = default_root(environ)
    return PrivateRoot(path, f"the default root, {_default_where(path)}", is_default=True)


def private_root(environ: Mapping[str, str] | None = None, settings: Path | None = None) -> PrivateRoot:
    """The configured root, else the default one."""
    return configured_root(environ, settings) or default_private_root(environ)


def ensure_default_root(root: PrivateRoot) -> bool:
    """Creates the default root, readable by this account only; True when it was created now."""
    if not root.is_default or root.path.is_dir():
        return False
    root.path.mkdir(parents=True, mode=0o700)
    return True


def how_to_add_folder(root: PrivateRoot) -> str:
    return (f"put the person's photos in a folder of their own inside {root.described} (any name that "
            "does not name the person), then refresh the node list (press R) and pick it.")


def how_to_configure(environ: Mapping[str, str] | None = None) -> str:
    return (f"To keep the photos elsewhere, set the root once on this machine: the environment variable "
            f"{ENV_ROOT}=<folder that holds your photo folders> before starting ComfyUI, or "
            f'{{"{SETTINGS_KEY}": "<that folder>"}} in {shown(settings_file(environ))}.')


def relative_folder(name: str, root: PrivateRoot) -> PurePosixPath:
    """`name` as a relative folder name, or PrivatePathError saying why it may not be a path."""
    text = name.strip().replace("\\", "/")
    relative = PurePosixPath(text)
    if not text or text in (".", "./"):
        raise PrivatePathError(f"no photo folder given: pick the folder of the person's photos inside "
                               f"{root.described} from the list.")
    if relative.is_absolute() or text.startswith("~") or re.match(r"^[A-Za-z]:", text):
        raise PrivatePathError(
            f"the photo folder {name!r} is an absolute path, and only a folder name inside your "
            f"private-photos root ({root.described}) is accepted. Every value typed into a node travels "
            "with the workflows you share, stays in ComfyUI's history and is written into the metadata "
            "of every image the stock Save Image node saves, so a path would publish your account name "
            "and folder layout. Put the photos in a folder inside the root and give its name (e.g. "
            "'my_photos'). " + how_to_configure())
    if ".." in relative.parts:
        raise PrivatePathError(f"the photo folder {name!r} contains '..'; give a folder inside your "
                               f"private-photos root ({root.described}), e.g. 'my_photos'. " + how_to_configure())
    return relative


def resolve_private_folder(name: str, environ: Mapping[str, str] | None = None,
                           settings: Path | None = None, served: Iterable[tuple[str, Path]] = ()) -> Path:
    """The folder `name` inside the private-photos root; refuses paths, `..` and missing folders.
    `served`: (name, folder) of places a server publishes; a missing folder found in one of them
    (e.g. photos left in ComfyUI's input folder) is not used, and the message says what to do."""
    root = private_root(environ, settings)
    relative = relative_folder(name, root)
    folder = root.path / relative
    if folder.is_dir():
        return folder
    missing = f"there is no folder {name!r} inside your private-photos root ({root.described})"
    for where, place in served:
        if holds_images(Path(place) / relative):
            raise PrivatePathError(
                f"{missing}, but there is one in {where}, which anyone who can reach this server can "
                f"download. Move it into {root.described} (recommended); to keep using it where it "
                f"is, point {ENV_ROOT} at that folder on purpose (the node then warns on every run).")
    raise PrivatePathError(f"{missing}; {how_to_add_folder(root)}")


def list_private_folders(root: Path) -> list[str]:
    """The folders under `root` that hold images, by relative name ('a', 'a/b'), down to LIST_DEPTH
    levels; hidden ones left out."""
    root = Path(root)
    found = []
    for current, dirs, _ in os.walk(root):
        depth = len(Path(current).relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < LIST_DEPTH else []
        if depth and holds_images(Path(current)):
            found.append(Path(current).relative_to(root).as_posix())
    return sorted(found)


def holds_images(folder: Path) -> bool:
    """Whether `folder` holds an image file (not counting hidden files or subfolders)."""
    from .photos import IMAGE_SUFFIXES

    try:
        return any(e.is_file() and not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_SUFFIXES
                   for e in os.scandir(folder))
    except OSError:  # missing or unreadable
        return False


def served_by(folder: Path, served: Iterable[tuple[str, Path]]) -> str | None:
    """The name of the first of `served` ((name, folder) a server publishes) that holds `folder`."""
    real = Path(os.path.realpath(folder))
    for name, place in served:
        if real.is_relative_to(os.path.realpath(place)):
            return name
    return None


def neutral_lora_name(today: date | None = None) -> str:
    """iddm_<YYYYMMDD>_<6 random hex>: says nothing about whose LoRA it is."""
    return f"iddm_{(today or date.today()):%Y%m%d}_{secrets.token_hex(3)}"


def is_neutral_lora_name(name: str) -> bool:
    """True for a bare neutral name, with or without .safetensors (no folders: they can name people)."""
    base = name[: -len(LORA_SUFFIX)] if name.endswith(LORA_SUFFIX) else name
    return NEUTRAL_LORA.fullmatch(base) is not None
