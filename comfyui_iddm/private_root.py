"""Where the private photos live, named so that nothing shared ever carries a path.

Every value typed into a ComfyUI node travels with the workflows people share, is kept in the
server's /history, and is written into the metadata of each image the stock Save Image node saves.
So the photo folder is chosen by a name RELATIVE to a private-photos root that is configured once on
this machine (ComfyUI's input folder unless the environment variable IDDM_PRIVATE_ROOT or the
settings file says otherwise). Absolute paths and `..` are refused. Messages never print the root's
absolute path either: they end up in /history and the server log, which others may read.

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
from typing import Mapping

ENV_ROOT = "IDDM_PRIVATE_ROOT"
SETTINGS_KEY = "private_root"
SETTINGS_NAME = "settings.json"
APP_DIR = "comfyui-iddm"

NEUTRAL_LORA = re.compile(r"iddm_\d{8}_[0-9a-f]{6}")
LORA_SUFFIX = ".safetensors"


class PrivatePathError(ValueError):
    """A folder name that would publish a path, or a root that is not set up; says what to do."""


@dataclass(frozen=True)
class PrivateRoot:
    path: Path
    described: str  # where it comes from, in words, without the absolute path


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


def private_root(default: Path, environ: Mapping[str, str] | None = None,
                 settings: Path | None = None) -> PrivateRoot:
    """The configured root, else `default` (ComfyUI's input folder, given by the caller)."""
    return configured_root(environ, settings) or PrivateRoot(Path(default), "ComfyUI's input folder")


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


def resolve_private_folder(name: str, default_root: Path, environ: Mapping[str, str] | None = None,
                           settings: Path | None = None) -> Path:
    """The folder `name` inside the private-photos root; refuses paths, `..` and missing folders."""
    root = private_root(default_root, environ, settings)
    folder = root.path / relative_folder(name, root)
    if not folder.is_dir():
        raise PrivatePathError(f"there is no folder {name!r} inside your private-photos root "
                               f"({root.described}); create it and put the photos there, or pick an "
                               "existing folder from the list.")
    return folder


def list_private_folders(root: Path) -> list[str]:
    """Every folder under `root` by its relative name ('a', 'a/b'), hidden ones left out."""
    root = Path(root)
    found = []
    for current, dirs, _ in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend((Path(current) / d).relative_to(root).as_posix() for d in dirs)
    return sorted(found)


def neutral_lora_name(today: date | None = None) -> str:
    """iddm_<YYYYMMDD>_<6 random hex>: says nothing about whose LoRA it is."""
    return f"iddm_{(today or date.today()):%Y%m%d}_{secrets.token_hex(3)}"


def is_neutral_lora_name(name: str) -> bool:
    """True for a bare neutral name, with or without .safetensors (no folders: they can name people)."""
    base = name[: -len(LORA_SUFFIX)] if name.endswith(LORA_SUFFIX) else name
    return NEUTRAL_LORA.fullmatch(base) is not None
