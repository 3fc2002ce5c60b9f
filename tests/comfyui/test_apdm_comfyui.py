"""IDDM Anti-Personalize Model on a real ComfyUI server (CPU, the tiny random-weight SD1.5 checkpoint):
the shipped workflow "anti-personalize a model" runs (scaled down) and saves a protection LoRA holding
settings and figures only, which the stock LoraLoader loads with every key and which changes what the
model draws; Cancel stops it with no file left, and resume continues the saved iterations.

Runs only when $COMFYUI_PATH points at a ComfyUI checkout (tests/comfyui/README.md).
"""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import comfyui_fixtures as cf  # noqa: E402
import workflow_graphs as wg  # noqa: E402

ROOT = cf.comfyui_path()
pytestmark = cf.comfyui_marks("run IDDM Anti-Personalize Model on a real ComfyUI server")
RUN = uuid.uuid4().hex[:6]
PHOTOS = f"iddm_apdm_{RUN}"
WORKFLOW = "iddm_anti_personalize_model"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with cf.pack_server(tmp_path_factory.mktemp("comfy"), PHOTOS, f"iddm_test_{RUN}") as server:
        yield server


def graph(suffix: str, **settings) -> tuple[dict, dict]:
    """The shipped workflow scaled down, and its anti-personalize node's inputs (to change)."""
    api = cf.tiny_run(json.loads((wg.WORKFLOWS / "api" / f"{WORKFLOW}.json").read_text()), PHOTOS, f"_{RUN}_{suffix}")
    node = next(n for n in api.values() if n["class_type"] == "IDDMAntiPersonalizeModel")
    node["inputs"].update(settings)
    return api, node["inputs"]


def test_workflow_saves_a_protection_the_stock_loader_applies(server):
    api, inputs = graph("wf", lr=1e-2)  # one iteration: a large rate, so the change is visible
    entry = cf.run_graph(server, api)
    made = cf.loras(f"iddm_test_{RUN}_wf")
    assert [m.name for m in made] == [f"{inputs['protection_name']}.safetensors"]
    with safe_open(str(made[0]), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["apdm.protect_weights"] == "lora" and set(json.loads(meta["apdm.figures"])) >= {
        "subject_loss_base", "subject_loss_protected"}
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert PHOTOS not in json.dumps(meta) and PHOTOS not in json.dumps(entry["outputs"])  # (the graph names it)
    assert cf.stock_lora_effect(server, made[0].name) > 0.05  # 8-bit pixel units; identical would be 0


def test_cancel_leaves_no_file_and_resume_continues(server):
    from comfyui_iddm.run_state import private_run_dir

    api, inputs = graph("resume", iterations=3, ft_steps=4, seed=5)
    state = private_run_dir(f"{inputs['protection_name']}.safetensors")  # the server runs as this user
    entry = cf.interrupt_after_first_iteration(server, api, state)
    assert "execution_interrupted" in [m[0] for m in cf.status_messages(entry)]
    assert not cf.loras(f"iddm_test_{RUN}_resume") and state.is_dir()
    assert not list((ROOT / "models" / "loras").glob(".*.tmp"))

    errors = json.dumps(cf.execution_errors(server.wait(server.queue(api), 600)))  # resume off: refused
    assert "unfinished run" in errors and state.is_dir()
    inputs["resume"] = True
    log_before = len(server.log())
    cf.run_graph(server, api)
    assert cf.loras(f"iddm_test_{RUN}_resume") and not state.exists()
    assert "3 iteration(s)" in server.log()[log_before:]


def test_a_name_with_folders_is_refused_before_any_work(server):
    api, _ = graph("bad", protection_name="../escape")
    log_before = len(server.log())
    errors = json.dumps(cf.execution_errors(server.wait(server.queue(api), 600)))
    assert "not a plain file name" in errors and "[IDDM] anti-personalizing" not in server.log()[log_before:]
    assert not list((ROOT / "models").glob("escape*"))
