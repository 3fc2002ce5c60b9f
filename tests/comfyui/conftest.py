"""Order and cleanliness of the tests against a real ComfyUI.

Each module sets up what it needs and takes it down again (the pack linked into custom_nodes, photos
in a private root of its own, a server with output/ and temp/ folders of its own), so the modules
pass alone and in any order: `--reverse-modules` runs them last module first. After each module,
ComfyUI's own output/ and input/ hold what they held before. (models/loras/ and custom_nodes/ are
not watched: the modules use them while they run, and so may test runs of other checkouts at the
same time; each module removes the LoRAs and links it made.)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comfyui_fixtures import comfyui_path  # noqa: E402

WATCHED = ("output", "input")  # ComfyUI's folders no test writes to: each server has its own output


def pytest_addoption(parser):
    parser.addoption("--reverse-modules", action="store_true",
                     help="run the test modules in reverse order (each must make its own set-up)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse-modules"):
        modules = list(dict.fromkeys(item.path for item in items))
        items.sort(key=lambda item: -modules.index(item.path))  # stable: tests keep their order


def entries(folder: Path) -> set[str]:
    """Everything below `folder` (links not followed), as relative paths."""
    return {(Path(current) / name).relative_to(folder).as_posix()
            for current, dirs, files in os.walk(folder) for name in dirs + files}


@pytest.fixture(scope="module", autouse=True)
def comfyui_left_as_found():
    root = comfyui_path()
    if root is None:  # the module skips
        yield
        return
    before = {name: entries(root / name) for name in WATCHED}
    yield
    left = {name: sorted(entries(root / name) - before[name]) for name in WATCHED}
    left = {name: paths for name, paths in left.items() if paths}
    assert not left, f"the module left files in ComfyUI's folders: {left}"
