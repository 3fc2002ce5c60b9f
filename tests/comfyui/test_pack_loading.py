"""The pack's entry point inside a real ComfyUI Python: one broken node module is logged with what
to install and the other nodes still load. (No server needed; runs under $COMFYUI_PYTHON.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import comfyui_fixtures as cf  # noqa: E402
import pack_nodes  # noqa: E402

ROOT = cf.comfyui_path()
REPO = Path(__file__).resolve().parents[2]
pytestmark = cf.comfyui_marks("load the pack the way ComfyUI does", slow=False)

SCRIPT = textwrap.dedent("""
    import asyncio, importlib.util, json, logging, sys
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    spec = importlib.util.spec_from_file_location("iddm_pack", sys.argv[1] + "/__init__.py",
                                                  submodule_search_locations=[sys.argv[1]])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["iddm_pack"] = pack
    spec.loader.exec_module(pack)
    # What a user sees when one node module needs a package that is not installed:
    broken = "iddm_pack.nodes.lora_node"
    sys.modules[broken] = None  # importing it now raises ModuleNotFoundError
    nodes = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
    import folder_paths
    print(json.dumps({"nodes": [n.GET_SCHEMA().node_id for n in nodes],
                      "facerecognition": folder_paths.get_folder_paths("facerecognition")}))
""")


def test_a_broken_node_module_is_reported_and_the_rest_load(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_DATA_HOME": str(tmp_path)}  # the default photo root goes there
    result = subprocess.run([cf.comfyui_python(), "-c", SCRIPT, str(REPO)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    declared = {node.node_id for node in pack_nodes.load("spec").ALL_NODES}
    assert sorted(loaded["nodes"]) == sorted(declared - {"IDDMLoadProtectedLoRA"})  # all but the broken module's
    assert loaded["facerecognition"][0].endswith("models/facerecognition")
    message = next(line for line in result.stderr.splitlines() if "nodes/lora_node.py" in line)
    assert "unavailable" in message and "pip install -r" in message and "requirements.txt" in message
