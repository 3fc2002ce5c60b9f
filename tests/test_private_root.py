"""The private-photos root: folders are named relative to it, paths are refused, nothing prints it."""
from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path

import pytest

from comfyui_iddm.private_root import (ENV_ROOT, PrivatePathError, configured_root, is_neutral_lora_name,
                                       list_private_folders, neutral_lora_name, private_root,
                                       resolve_private_folder, settings_file)


@pytest.fixture
def roots(tmp_path: Path):
    """ComfyUI's input folder and a separate configured root, each with photo folders."""
    comfy_input, own = tmp_path / "input", tmp_path / "elsewhere" / "anna_private_root"
    for folder in (comfy_input / "my_photos", comfy_input / "sets" / "b", own / "set1", own / ".hidden"):
        folder.mkdir(parents=True)
    return comfy_input, own, tmp_path / "no_settings.json"


def test_default_root_is_comfyui_input(roots):
    comfy_input, _, no_settings = roots
    assert resolve_private_folder("my_photos", comfy_input, {}, no_settings) == comfy_input / "my_photos"
    assert resolve_private_folder("sets\\b", comfy_input, {}, no_settings) == comfy_input / "sets" / "b"
    assert private_root(comfy_input, {}, no_settings).described == "ComfyUI's input folder"


def test_environment_variable_wins_over_settings_file(roots, tmp_path):
    comfy_input, own, _ = roots
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"private_root": str(comfy_input)}))
    env = {ENV_ROOT: str(own)}
    assert resolve_private_folder("set1", comfy_input, env, settings) == own / "set1"
    assert resolve_private_folder("my_photos", comfy_input, {}, settings) == comfy_input / "my_photos"
    with pytest.raises(PrivatePathError, match="no folder 'my_photos'"):
        resolve_private_folder("my_photos", comfy_input, env, settings)


def test_settings_file_root(roots, tmp_path):
    comfy_input, own, _ = roots
    settings = tmp_path / "cfg" / "settings.json"
    settings.parent.mkdir()
    settings.write_text(json.dumps({"private_root": str(own)}))
    root = configured_root({}, settings)
    assert root.path == own and "settings" in root.described
    assert resolve_private_folder("set1", comfy_input, {}, settings) == own / "set1"


@pytest.mark.parametrize("name", ["/home/anna/photos", "C:\\Users\\anna\\Pictures", "c:/x", "~/photos",
                                  "~anna/photos", "\\\\server\\share\\photos"])
def test_absolute_paths_refused_with_why_and_how(roots, name):
    comfy_input, own, no_settings = roots
    with pytest.raises(PrivatePathError) as error:
        resolve_private_folder(name, comfy_input, {ENV_ROOT: str(own)}, no_settings)
    message = str(error.value)
    assert "absolute path" in message and "metadata" in message and "workflows you share" in message
    assert ENV_ROOT in message and "settings.json" in message
    assert str(own) not in message and str(comfy_input) not in message  # the root's path is never printed


@pytest.mark.parametrize("name", ["../input", "my_photos/../../x", "a/..\\.."])
def test_dot_dot_refused(roots, name):
    comfy_input, _, no_settings = roots
    with pytest.raises(PrivatePathError, match=r"'\.\.'"):
        resolve_private_folder(name, comfy_input, {}, no_settings)


@pytest.mark.parametrize("name", ["", "  ", "."])
def test_empty_name_refused(roots, name):
    comfy_input, _, no_settings = roots
    with pytest.raises(PrivatePathError, match="no photo folder"):
        resolve_private_folder(name, comfy_input, {}, no_settings)


def test_bad_configuration_is_explained(roots, tmp_path):
    comfy_input, _, no_settings = roots
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


def test_folder_list_is_relative_and_skips_hidden(roots):
    comfy_input, own, _ = roots
    assert list_private_folders(comfy_input) == ["my_photos", "sets", "sets/b"]
    assert list_private_folders(own) == ["set1"]


def test_neutral_lora_names():
    name = neutral_lora_name(date(2026, 11, 22))
    assert re.fullmatch(r"iddm_20261122_[0-9a-f]{6}", name)
    assert neutral_lora_name() != neutral_lora_name() or neutral_lora_name() != neutral_lora_name()
    assert is_neutral_lora_name(name) and is_neutral_lora_name(name + ".safetensors")
    for other in ("anna_lora", "iddm_protected", "iddm_20261122_ABCDEF", "people/" + name,
                  name + "_anna", "iddm_2026112_abcdef.safetensors"):
        assert not is_neutral_lora_name(other), other

