"""The private-photos root: folders are named relative to it, paths are refused, nothing prints it;
by default it is a per-user data folder that no ComfyUI route serves."""
from __future__ import annotations

import json
import os
import re
import sys
from datetime import date
from pathlib import Path

import pytest
from PIL import Image

from comfyui_iddm.private_root import (ENV_ROOT, LIST_DEPTH, PrivatePathError, configured_root,
                                       default_private_root, ensure_default_root, is_neutral_lora_name,
                                       list_private_folders, neutral_lora_name, private_root,
                                       resolve_private_folder, served_by, settings_file)

linux_only = pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="checks the XDG convention of Linux")


def photo(folder: Path, name: str = "a.jpg") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(folder / name)
    return folder / name


@pytest.fixture
def roots(tmp_path: Path):
    """A data home (where the default root goes), ComfyUI's input folder and a separate configured
    root, each with photo folders; and a settings file that does not exist."""
    data, comfy_input = tmp_path / "data", tmp_path / "comfyui" / "input"
    own = tmp_path / "elsewhere" / "anna_private_root"
    default = data / "comfyui-iddm" / "photos"
    for folder in (default / "my_photos", comfy_input / "legacy", own / "set1"):
        photo(folder)
    return default, comfy_input, own, {"XDG_DATA_HOME": str(data)}, tmp_path / "no_settings.json"


@linux_only
def test_default_root_is_a_per_user_data_folder_outside_comfyui(roots, monkeypatch, tmp_path):
    default, comfy_input, _, env, no_settings = roots
    root = private_root(env, no_settings)
    assert root.path == default and root.is_default
    assert root.described == "the default root, $XDG_DATA_HOME/comfyui-iddm/photos"  # no absolute path
    assert resolve_private_folder("my_photos", env, no_settings) == default / "my_photos"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home_root = default_private_root({})
    assert home_root.path == tmp_path / "home" / ".local" / "share" / "comfyui-iddm" / "photos"
    assert home_root.described == "the default root, ~/.local/share/comfyui-iddm/photos"


@linux_only
def test_default_root_is_made_on_first_use_readable_by_this_account_only(tmp_path):
    root = default_private_root({"XDG_DATA_HOME": str(tmp_path / "data")})
    assert not root.path.exists()
    assert ensure_default_root(root) and root.path.is_dir()
    assert (root.path.stat().st_mode & 0o777) == 0o700
    assert not ensure_default_root(root)  # already there
    assert list_private_folders(root.path) == []


def test_a_configured_root_is_never_created(tmp_path):
    with pytest.raises(PrivatePathError, match="does not exist"):
        configured_root({ENV_ROOT: str(tmp_path / "missing")}, tmp_path / "no_settings.json")
    assert not (tmp_path / "missing").exists()


@linux_only
def test_photos_left_in_a_served_folder_are_not_used_by_default_and_the_message_says_why(roots):
    default, comfy_input, _, env, no_settings = roots
    served = [("ComfyUI's input folder (served at /view?type=input)", comfy_input)]
    with pytest.raises(PrivatePathError) as error:
        resolve_private_folder("legacy", env, no_settings, served)
    message = str(error.value)
    assert "ComfyUI's input folder" in message and "Move it into the default root" in message
    assert ENV_ROOT in message and str(comfy_input) not in message and str(default) not in message
    # ComfyUI's own folders without images (e.g. input/3d) are not mistaken for photo folders.
    (comfy_input / "3d").mkdir()
    with pytest.raises(PrivatePathError, match="no folder '3d'") as error:
        resolve_private_folder("3d", env, no_settings, served)
    assert "served" not in str(error.value) and "press R" in str(error.value)
    # Pointing the root there on purpose keeps them working.
    assert resolve_private_folder("legacy", {**env, ENV_ROOT: str(comfy_input)}, no_settings, served) \
        == comfy_input / "legacy"


def test_served_by_names_the_served_folder_that_holds_a_folder(tmp_path):
    served_input, elsewhere = tmp_path / "comfyui" / "input", tmp_path / "private"
    photo(served_input / "set")
    photo(elsewhere / "set")
    served = [("input", served_input), ("output", tmp_path / "comfyui" / "output")]
    assert served_by(served_input / "set", served) == "input"
    assert served_by(served_input, served) == "input"
    assert served_by(elsewhere / "set", served) is None
    assert served_by(tmp_path / "comfyui", served) is None  # the base folder itself is not served
    link = tmp_path / "link_to_served"
    os.symlink(served_input / "set", link)  # a link into a served folder is still served
    assert served_by(link, served) == "input"


def test_environment_variable_wins_over_settings_file(roots, tmp_path):
    default, comfy_input, own, env, _ = roots
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"private_root": str(comfy_input)}))
    assert resolve_private_folder("set1", {**env, ENV_ROOT: str(own)}, settings) == own / "set1"
    assert resolve_private_folder("legacy", env, settings) == comfy_input / "legacy"
    with pytest.raises(PrivatePathError, match="no folder 'legacy'"):
        resolve_private_folder("legacy", {**env, ENV_ROOT: str(own)}, settings)


def test_settings_file_root(roots, tmp_path):
    _, _, own, env, _ = roots
    settings = tmp_path / "cfg" / "settings.json"
    settings.parent.mkdir()
    settings.write_text(json.dumps({"private_root": str(own)}))
    root = configured_root(env, settings)
    assert root.path == own and "settings" in root.described and not root.is_default
    assert resolve_private_folder("set1", env, settings) == own / "set1"


@pytest.mark.parametrize("name", ["/home/anna/photos", "C:\\Users\\anna\\Pictures", "c:/x", "~/photos",
                                  "~anna/photos", "\\\\server\\share\\photos"])
def test_absolute_paths_refused_with_why_and_how(roots, name):
    _, comfy_input, own, env, no_settings = roots
    with pytest.raises(PrivatePathError) as error:
        resolve_private_folder(name, {**env, ENV_ROOT: str(own)}, no_settings)
    message = str(error.value)
    assert "absolute path" in message and "metadata" in message and "workflows you share" in message
    assert ENV_ROOT in message and "settings.json" in message
    assert str(own) not in message and str(comfy_input) not in message  # the root's path is never printed


@pytest.mark.parametrize("name", ["../input", "my_photos/../../x", "a/..\\.."])
def test_dot_dot_refused(roots, name):
    _, _, _, env, no_settings = roots
    with pytest.raises(PrivatePathError, match=r"'\.\.'"):
        resolve_private_folder(name, env, no_settings)


@pytest.mark.parametrize("name", ["", "  ", "."])
def test_empty_name_refused(roots, name):
    _, _, _, env, no_settings = roots
    with pytest.raises(PrivatePathError, match="no photo folder"):
        resolve_private_folder(name, env, no_settings)


def test_bad_configuration_is_explained(roots, tmp_path):
    _, _, _, _, no_settings = roots
    with pytest.raises(PrivatePathError, match="does not exist"):
        configured_root({ENV_ROOT: str(tmp_path / "missing")}, no_settings)
    with pytest.raises(PrivatePathError, match="absolute"):
        configured_root({ENV_ROOT: "relative/root"}, no_settings)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(PrivatePathError, match="not a JSON object"):
        configured_root({}, broken)
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    assert configured_root({}, empty) is None


def test_settings_file_location_follows_platform_conventions(tmp_path, monkeypatch):
    import sys
    if sys.platform in ("win32", "darwin"):
        pytest.skip("checks the XDG convention of Linux")
    assert settings_file({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "comfyui-iddm" / "settings.json"
    assert settings_file({}) == Path.home() / ".config" / "comfyui-iddm" / "settings.json"


def test_folder_list_holds_only_folders_with_images(tmp_path):
    root = tmp_path / "root"
    photo(root / "anna")
    photo(root / "sets" / "b", "b.PNG")  # 'sets' itself holds no image: only 'sets/b' is listed
    (root / "3d").mkdir()  # like ComfyUI's input/3d: no image
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("x")
    photo(root / ".hidden")
    photo(root / "dot_only", ".thumb.jpg")  # only a hidden file
    photo(root / "x" / "y" / "z")  # LIST_DEPTH levels down
    photo(root / "p" / "q" / "r" / "too_deep")
    assert LIST_DEPTH == 3
    assert list_private_folders(root) == ["anna", "sets/b", "x/y/z"]
    photo(root, "loose.jpg")  # an image in the root itself is no folder to pick
    assert list_private_folders(root) == ["anna", "sets/b", "x/y/z"]


def test_neutral_lora_names():
    name = neutral_lora_name(date(2026, 11, 22))
    assert re.fullmatch(r"iddm_20261122_[0-9a-f]{6}", name)
    assert neutral_lora_name() != neutral_lora_name() or neutral_lora_name() != neutral_lora_name()
    assert is_neutral_lora_name(name) and is_neutral_lora_name(name + ".safetensors")
    for other in ("anna_lora", "iddm_protected", "iddm_20261122_ABCDEF", "people/" + name,
                  name + "_anna", "iddm_2026112_abcdef.safetensors"):
        assert not is_neutral_lora_name(other), other

