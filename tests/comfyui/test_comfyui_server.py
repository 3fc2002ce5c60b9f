"""The pack on a real ComfyUI server (CPU, tiny random-weight SD1.5 checkpoint).

Runs only when $COMFYUI_PATH points at a ComfyUI checkout whose Python ($COMFYUI_PYTHON, default
this interpreter) has ComfyUI's requirements and this pack's; skipped otherwise (CI has no ComfyUI).
Slow: several CPU trainings of a minute or more each. See tests/comfyui/README.md.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import comfyui_fixtures as cf  # noqa: E402
import workflow_graphs as wg  # noqa: E402

ROOT = cf.comfyui_path()
pytestmark = cf.comfyui_marks("run the tests against a real ComfyUI server")
RUN = uuid.uuid4().hex[:6]  # keeps this run's LoRAs and photo folder apart from anything else
PHOTOS = f"iddm_it_{RUN}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with cf.pack_server(tmp_path_factory.mktemp("comfy"), PHOTOS, f"iddm_test_{RUN}") as server:
        yield server


run, loras = cf.run_graph, cf.loras


def test_pack_loads_without_errors_and_declares_its_nodes(server):
    startup = server.log().split("Starting server")[0]
    assert "custom_nodes/comfyui-iddm" in startup
    assert not [line for line in startup.splitlines() if "IMPORT FAILED" in line and "iddm" in line]
    assert "[IDDM]" not in startup  # the pack logs only problems at start-up
    info = server.get("/object_info")
    spec = wg.pack_nodes.load("spec")
    for node in spec.ALL_NODES:
        declared = info[node.node_id]
        assert declared["category"] == spec.CATEGORY
        required = [p.name for p in node.inputs if not p.optional]
        optional = [p.name for p in node.inputs if p.optional]
        assert declared["input_order"]["required"] == required
        assert declared["input_order"].get("optional", []) == optional
        assert declared["output"] == [p.type for p in node.outputs]
        assert declared["output_name"] == [p.name for p in node.outputs]
        for port in node.inputs:
            group = "optional" if port.optional else "required"
            assert declared["input"][group][port.name][1]["tooltip"] == port.tooltip
    # ComfyUI's template browser lists the UI-format workflows (not the API ones).
    templates = server.get("/workflow_templates")
    assert sorted(templates["comfyui-iddm"]) == sorted(t.title for t in wg.TEMPLATES.values())
    # The photo folder list offers our folder by its relative name only.
    folders = info["IDDMLoadPrivatePhotos"]["input"]["required"]["folder"][1]["options"]
    assert PHOTOS in folders and not any(f.startswith("/") for f in folders)


def test_train_and_generate_workflow_runs_and_saves_a_lora(server):
    api = json.loads((wg.WORKFLOWS / "api" / "iddm_train_and_generate.json").read_text())
    entry = run(server, cf.tiny_run(api, PHOTOS, f"_{RUN}_tg"))
    made = loras(f"iddm_test_{RUN}_tg")
    assert [p.name for p in made] == [f"iddm_test_{RUN}_tg_6.safetensors"]
    from comfyui_iddm.lora_io import load_lora, read_iddm_settings
    state, metadata = load_lora(made[0])
    assert all(k.startswith("lora_unet_") for k in state) and len(state) == 96  # 4 blocks x 2 attn x 4 proj x 3 keys
    settings = read_iddm_settings(metadata)
    assert settings["iterations"] == 1 and settings["resolution"] == 64
    outputs = entry["outputs"]
    train_ui = outputs["6"]["iddm_train"][0]
    assert len(train_ui["iterations"]) == 1 and len(train_ui["iterations"][0]["ft_loss"]) == 4
    similarity = outputs["14"]["iddm_similarity"][0]
    assert 0.0 <= similarity["fsr"] <= 1.0 and len(similarity["per_image"]) == 2
    saved = outputs["16"]["images"]
    assert len(saved) == 2 and all(s["type"] == "output" for s in saved)
    for image in saved:  # Save Public Image: pixels only
        assert not Image.open(server.output_dir / image["subfolder"] / image["filename"]).info


def test_privacy_sweep_and_generate_only_workflows_run(server):
    sweep = json.loads((wg.WORKFLOWS / "api" / "iddm_privacy_sweep.json").read_text())
    run(server, cf.tiny_run(sweep, PHOTOS, f"_{RUN}_sw"))
    made = loras(f"iddm_test_{RUN}_sw")
    assert len(made) == 3
    from comfyui_iddm.lora_io import load_lora, read_iddm_settings
    assert sorted(read_iddm_settings(load_lora(p)[1])["rho"] for p in made) == [0.1, 0.3, 0.5]
    generate = cf.tiny_run(json.loads((wg.WORKFLOWS / "api" / "iddm_generate_from_protected_lora.json").read_text()),
                           PHOTOS, "")
    loader = next(n for n in generate.values() if n["class_type"] == "IDDMLoadProtectedLoRA")
    loader["inputs"]["lora_name"] = made[0].name
    run(server, generate)


def test_saved_lora_loads_in_the_stock_loader_and_changes_the_output(server):
    made = loras(f"iddm_test_{RUN}_tg")
    if not made:
        pytest.skip("needs the LoRA of test_train_and_generate_workflow_runs_and_saves_a_lora")
    # Load Protected LoRA lists IDDM-made files first, before a stock LoRA that sorts earlier by name.
    stock = ROOT / "models" / "loras" / f"aaa_stock_{RUN}.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(stock), metadata={"ss_network_dim": "4"})
    try:
        listed = server.get("/object_info/IDDMLoadProtectedLoRA")["IDDMLoadProtectedLoRA"]["input"]
        options = listed["required"]["lora_name"][1]["options"]
        assert options.index(made[0].name) < options.index(stock.name)
    finally:
        stock.unlink()
    assert cf.stock_lora_effect(server, made[0].name) > 0.05  # 8-bit pixel units; identical would be 0


def test_cancel_stops_training_and_leaves_no_lora(server):
    api = json.loads((wg.WORKFLOWS / "api" / "iddm_train_and_generate.json").read_text())
    graph = cf.tiny_run(api, PHOTOS, f"_{RUN}_cancel")
    train = next(n for n in graph.values() if n["class_type"] == "IDDMTrain")
    train["inputs"].update(iterations=3, ft_steps=20, seed=7)  # long enough to cancel mid-way
    log_before = len(server.log())
    prompt_id = server.queue(graph)
    deadline = time.time() + 600
    while "[IDDM] training" not in server.log()[log_before:]:
        assert time.time() < deadline, "training never started"
        time.sleep(0.5)
    time.sleep(5)  # a few steps in
    server.post("/interrupt")
    cancelled_at = time.time()
    entry = server.wait(prompt_id, 600)
    stopped_after = time.time() - cancelled_at
    kinds = [m[0] for m in cf.status_messages(entry)]
    assert "execution_interrupted" in kinds, kinds
    assert stopped_after < 90, f"took {stopped_after:.0f} s to stop"  # one step is ~5-20 s on a busy CPU
    folder = ROOT / "models" / "loras"
    assert not loras(f"iddm_test_{RUN}_cancel") and not list(folder.glob(".*.tmp"))


def test_cancelled_training_resumes_from_its_last_finished_iteration(server):
    from comfyui_iddm.run_state import private_run_dir

    api = json.loads((wg.WORKFLOWS / "api" / "iddm_train_and_generate.json").read_text())
    graph = cf.tiny_run(api, PHOTOS, f"_{RUN}_resume")
    train = next(n for n in graph.values() if n["class_type"] == "IDDMTrain")
    train["inputs"].update(iterations=3, ft_steps=6, seed=3)
    file_name = f"{train['inputs']['lora_name']}.safetensors"
    state = private_run_dir(file_name)  # the server runs as this user, with this environment
    cf.interrupt_after_first_iteration(server, graph, state)
    assert not loras(f"iddm_test_{RUN}_resume") and state.is_dir()

    entry = server.wait(server.queue(graph), 600)  # resume off: refused, the saved work kept
    errors = json.dumps(cf.execution_errors(entry))
    assert "unfinished run" in errors and "resume" in errors and state.is_dir()

    train["inputs"]["resume"] = True
    log_before = len(server.log())
    run(server, graph)
    assert loras(f"iddm_test_{RUN}_resume") and not state.exists()
    assert "3 iteration(s)" in server.log()[log_before:]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_web_extension_draws_the_live_chart_without_console_errors(server, tmp_path):
    spec = wg.pack_nodes.load("spec")
    defs = wg.node_definitions()
    graph = cf.tiny_run(wg.train_and_generate(defs), PHOTOS, f"_{RUN}_web")
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(wg.to_ui(graph, defs)))
    screenshot = Path(os.environ.get("IDDM_SCREENSHOT", tmp_path / "iddm_chart.png"))
    result = subprocess.run([cf.comfyui_python(), str(Path(__file__).with_name("browser_check.py")), server.url,
                             str(workflow), str(screenshot)], capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state["extension_registered"]
    ours = [e for e in state["console_errors"] if "iddm" in e.lower()]
    assert ours == [], ours
    assert state["points"] == state["total"] == 6  # 2 + 2 fine-tune steps, 2 PGD steps
    assert set(state["phases"]) == {"finetune_reference", "stage2", "finetune_decoupled"}
    assert state["stage2_pixels"] > 20  # the Stage II series is drawn
    widgets = sum(1 + p.seed for p in spec.TRAIN.inputs if p.is_widget)  # optional widgets too
    assert state["saved_widget_values"] == widgets  # the chart is not saved into workflows
    assert state["similarity_text"].startswith("FSR ")
    assert state["lora_text"].startswith("IDDM ") and "rho 0.3" in state["lora_text"], state["lora_text"]
    assert screenshot.is_file() and screenshot.with_name(screenshot.stem + "_chart.png").is_file()
