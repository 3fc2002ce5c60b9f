"""Import the pack's nodes/ folder in tests without ComfyUI.

nodes/ is never a top-level package (ComfyUI has its own `nodes` module), so tests load it under a
private name; only its ComfyUI-free modules (spec, convert, annotate) are imported this way.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "iddm_pack_nodes"


def load(module: str):
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, REPO / "nodes" / "__init__.py", submodule_search_locations=[str(REPO / "nodes")])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.{module}")
