"""ComfyUI entry point of the IDDM pack (identity-decoupled personalization, arXiv 2604.00903).

Needs ComfyUI with the V3 node API (`comfy_api.latest`; tested with 0.3.64). Loading must never
break ComfyUI: an older ComfyUI gets one clear message, a node module that fails to import is
logged with what to install, and the other nodes still load.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent
WEB_DIRECTORY = "./web"
MIN_COMFYUI = "0.3.64"
LOG = logging.getLogger("comfyui-iddm")


def _import_engine() -> None:
    """`comfyui_iddm` from pip (pip install -e <pack>) or, if absent, from the pack folder itself
    (without putting the pack folder on sys.path, where our `nodes/` would shadow ComfyUI's)."""
    try:
        importlib.import_module("comfyui_iddm")
    except ModuleNotFoundError as error:
        if error.name != "comfyui_iddm":
            raise
        spec = importlib.util.spec_from_file_location(
            "comfyui_iddm", PACK_DIR / "comfyui_iddm" / "__init__.py",
            submodule_search_locations=[str(PACK_DIR / "comfyui_iddm")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_iddm"] = module
        spec.loader.exec_module(module)


def _install_hint(error: BaseException) -> str:
    missing = error.name if isinstance(error, ModuleNotFoundError) else None  # (NameError has .name too)
    requirements = PACK_DIR / "requirements.txt"
    if missing:
        return (f"the Python package '{missing}' is missing; install the pack's requirements with "
                f"ComfyUI's Python: python -m pip install -r \"{requirements}\" (or run install.py)")
    return f"{error.__class__.__name__}: {error}"


def _load_node_classes() -> list:
    from .nodes import NODE_MODULES

    classes = []
    for name in NODE_MODULES:
        try:
            module = importlib.import_module(f".nodes.{name}", __name__)
            for node_class in module.NODES:
                node_class.GET_SCHEMA()  # a broken schema fails here, not in ComfyUI's loader
        except Exception as error:  # one broken module must not hide the others
            LOG.error(f"[IDDM] nodes in nodes/{name}.py are unavailable: {_install_hint(error)}",
                      exc_info=not isinstance(error, ModuleNotFoundError))
            continue
        classes.extend(module.NODES)
    return classes


try:
    from comfy_api.latest import ComfyExtension
except ImportError:
    ComfyExtension = None
    LOG.error(f"[IDDM] this ComfyUI is too old for the IDDM nodes: they need the V3 node API "
              f"(comfy_api.latest, ComfyUI {MIN_COMFYUI} or newer). Update ComfyUI; nothing else "
              "is affected.")
    NODE_CLASS_MAPPINGS: dict = {}  # loads as an empty pack instead of a traceback

if ComfyExtension is not None:
    class IDDMExtension(ComfyExtension):
        async def get_node_list(self) -> list:
            try:
                _import_engine()
                from comfyui_iddm.allocator import keep_freed_memory, wanted_in_shared_process
                from .nodes.places import register_model_folders
                from .nodes.served import confine_model_previews
                register_model_folders()
                confine_model_previews()  # ComfyUI 0.3.64 serves any readable image as a model preview
                if wanted_in_shared_process() and keep_freed_memory():  # opt-in: ComfyUI's process is shared
                    LOG.info("[IDDM] IDDM_MALLOC_POLICY=keep: malloc keeps freed memory (faster CPU training)")
            except Exception as error:
                LOG.error(f"[IDDM] the IDDM engine could not be loaded, so no IDDM nodes are "
                          f"available: {_install_hint(error)}",
                          exc_info=not isinstance(error, ModuleNotFoundError))
                return []
            return _load_node_classes()

    async def comfy_entrypoint() -> ComfyExtension:
        return IDDMExtension()
