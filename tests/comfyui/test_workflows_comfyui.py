"""The shipped workflows as people use them, on a real ComfyUI server: the README's comfy-cli
command, the template browser, graphs saved with pack 0.1, and the live chart during and after a run.

The server is this module's own: `--base-directory` in a temporary folder (custom_nodes holding only
this pack, the tiny checkpoint also under the shipped graphs' checkpoint name, its own input, output,
temp and user folders) and the photos in a private root under the shipped graphs' folder name, so
the shipped files run as they are. comfy-cli: $COMFY_CLI or `comfy` on PATH (pip install comfy-cli);
Chromium: /usr/bin/chromium. `IDDM_SCREENSHOT=DIR` keeps the screenshots there.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import comfyui_fixtures as cf  # noqa: E402
import workflow_graphs as wg  # noqa: E402

ROOT = cf.comfyui_path()
HERE = Path(__file__).resolve().parent
pytestmark = cf.comfyui_marks("check the shipped workflows on a real ComfyUI")
RUN = uuid.uuid4().hex[:6]
spec = wg.pack_nodes.load("spec")
README_COMMAND = re.search(r"`(comfy run --workflow [^`]+)`", (cf.REPO / "README.md").read_text()).group(1)
LEGACY = cf.REPO / "tests" / "data" / "legacy_workflows"
MAKE_THUMBNAILS = "make them with tests/comfyui/template_browser.py COMFY_URL thumbnails workflows"
needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                    reason="needs Debian's chromium (apt-get install chromium)")


def comfy_cli() -> str | None:
    return os.environ.get("COMFY_CLI") or shutil.which("comfy")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("workflows")
    base = folder / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-iddm").symlink_to(cf.REPO, target_is_directory=True)
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    # no models/loras: ComfyUI's checkout ships it, a bare base folder lacks it, and IDDM Train makes it
    tiny = cf.ensure_tiny_checkpoint(ROOT)
    for name in {cf.CHECKPOINT_NAME, wg.CHECKPOINT}:
        (checkpoints / name).symlink_to(tiny)
    private = folder / "private"
    cf.make_face_photos(private / wg.PHOTO_FOLDER)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("IDDM_PRIVATE_ROOT", str(private))
        server = cf.ComfyServer(ROOT, folder / "server.log", flags=["--base-directory", str(base)])
        server.start()
    try:
        yield server, base, folder
    finally:
        server.stop()


def keep(folder: Path, name: str) -> Path:
    """Where a screenshot goes: $IDDM_SCREENSHOT (a folder) if set, else the test's folder."""
    target = Path(os.environ.get("IDDM_SCREENSHOT") or folder)
    if target.suffix:  # a file name (tests/comfyui/README.md's form): its folder
        target = target.parent
    target.mkdir(parents=True, exist_ok=True)
    return target / name


def run_cli(cli: str, *args: str, home: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([cli, *args], cwd=cf.REPO, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, "HOME": str(home), "COLUMNS": "200"})


def browser(*args: str, timeout: float = 2400) -> dict:
    result = subprocess.run([cf.comfyui_python(), *map(str, args)], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def lora_settings(base: Path, name: str) -> dict:
    from comfyui_iddm.lora_io import load_lora, read_iddm_settings
    return read_iddm_settings(load_lora(base / "models" / "loras" / f"{name}.safetensors")[1])


def test_the_readmes_comfy_run_command_is_accepted_and_training_starts(site, tmp_path):
    """Exactly the README's command (plus where the server is): comfy-cli checks every dropdown value
    against the server's lists before it queues. At the shipped settings (K=10 at 512 px) the run
    takes far too long on a CPU, so it is stopped once IDDM Train is training."""
    cli = comfy_cli()
    if cli is None:
        pytest.skip("needs comfy-cli (pip install comfy-cli; or set COMFY_CLI to its `comfy`)")
    server, base, _ = site
    words = shlex.split(README_COMMAND)
    assert words[:2] == ["comfy", "run"] and (cf.REPO / words[words.index("--workflow") + 1]).is_file()
    log_before, history_before = len(server.log()), set(server.get("/history"))
    process = subprocess.Popen([cli, *words[1:], "--host", "127.0.0.1", "--port", str(server.port)],
                               cwd=cf.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL, env={**os.environ, "HOME": str(tmp_path), "COLUMNS": "200"})
    deadline = time.time() + 900
    while "[IDDM] training" not in server.log()[log_before:]:
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"comfy run ended before training started (exit {process.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
        assert time.time() < deadline, "IDDM Train never started"
        time.sleep(1)
    server.post("/interrupt")
    # comfy-cli ends on the interruption, or earlier when the server is silent for its --timeout
    # (120 s: one step at 512 px on a busy CPU can take that long); the server ends the step first.
    out, err = process.communicate(timeout=900)
    assert "validation" not in (out + err).lower() and "is unavailable" not in out + err, out + err
    deadline = time.time() + 900
    while (queue := server.get("/queue"))["queue_running"] or queue["queue_pending"]:
        assert time.time() < deadline, "the interrupted run never ended"
        time.sleep(2)
    # the one run comfy-cli queued (its output names the prompt only when the run succeeds)
    queued = [entry for prompt_id, entry in server.get("/history").items() if prompt_id not in history_before]
    assert len(queued) == 1 and queued[0]["prompt"][2]["6"]["class_type"] == "IDDMTrain", queued
    assert "execution_interrupted" in [m[0] for m in cf.status_messages(queued[0])]
    loader = queued[0]["prompt"][2]["10"]["inputs"]
    assert loader["lora_name"] == spec.CONNECTED_LORA  # the listed entry comfy-cli accepted


def test_comfy_run_waits_for_a_ui_format_workflow_to_its_end(site, tmp_path):
    """The same tool on the UI-format file (converted by comfy-cli from /object_info), scaled down to
    a short CPU run; --wait returns when the portraits are saved."""
    cli = comfy_cli()
    if cli is None:
        pytest.skip("needs comfy-cli (pip install comfy-cli; or set COMFY_CLI to its `comfy`)")
    server, base, _ = site
    defs = wg.node_definitions()
    api = cf.tiny_run(json.loads((wg.WORKFLOWS / "api" / "iddm_train_and_generate.json").read_text()),
                      wg.PHOTO_FOLDER, f"_{RUN}_cli")
    workflow = tmp_path / "ui.json"
    workflow.write_text(json.dumps(wg.to_ui(api, defs)))
    converted = run_cli(cli, "run", "--workflow", str(workflow), "--host", "127.0.0.1", "--port", str(server.port),
                        "--print-prompt", home=tmp_path, timeout=120)
    assert converted.returncode == 0, converted.stdout + converted.stderr
    prompt = json.loads(converted.stdout)["data"]["prompt"]
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in api.items()}
    result = run_cli(cli, "run", "--workflow", str(workflow), "--wait", "--host", "127.0.0.1",
                     "--port", str(server.port), home=tmp_path, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    envelope = json.loads(result.stdout.strip().splitlines()[-1])
    assert envelope["ok"] and envelope["data"]["status"] == "completed"
    assert len([u for u in envelope["data"]["outputs_by_node"]["16"] if "type=output" in u]) == 2
    assert lora_settings(base, f"iddm_test_{RUN}_cli_6")["iterations"] == 1


@needs_chromium
def test_the_template_browser_shows_titles_descriptions_and_thumbnails(site, tmp_path):
    server, _, folder = site
    shot = keep(folder, "template_browser.png")
    state = browser(HERE / "template_browser.py", server.url, "browse", shot)
    assert state["category"] == "IDDM privacy"  # locales/en/main.json
    cards = {card["name"]: card for card in state["cards"]}
    assert set(cards) == {t.title for t in wg.TEMPLATES.values()}
    for template in wg.TEMPLATES.values():
        card = cards[template.title]
        assert card["title"] == template.title and not card["title_cut"]
        assert card["description"] == template.description  # not the file name again
        assert card["thumbnail"] == [512, 512], f"{template.title}: no thumbnail; {MAKE_THUMBNAILS}"
    ours = [e for e in state["console_errors"] if "iddm" in e.lower() or "workflow_templates" in e]
    assert ours == [] and shot.is_file()


def test_an_old_api_graph_runs_with_the_settings_it_gives_iddm_train(site):
    """Pack 0.1's API file: every setting on IDDM Train, Load Protected LoRA's lora_name empty."""
    server, base, _ = site
    graph = cf.tiny_run(json.loads((LEGACY / "train_and_generate_0.1_api.json").read_text()),
                        wg.PHOTO_FOLDER, f"_{RUN}_old_api")
    graph["1"]["inputs"]["ckpt_name"] = cf.CHECKPOINT_NAME
    assert "options" not in graph["6"]["inputs"] and graph["10"]["inputs"]["lora_name"] == ""
    graph["6"]["inputs"].update(ft_steps=3, rank=2)  # not the defaults: they must reach the run
    cf.run_graph(server, graph)
    settings = lora_settings(base, f"iddm_test_{RUN}_old_api_6")
    assert (settings["ft_steps"], settings["pgd_steps"], settings["rank"], settings["iterations"]) == (3, 2, 2, 1)


def legacy_ui(api: dict) -> dict:
    """Pack 0.1's UI file holding the values of `api` (an API graph of the same nodes)."""
    defs = wg.node_definitions()
    ui = json.loads((LEGACY / "train_and_generate_0.1_ui.json").read_text())
    for node in ui["nodes"]:
        inputs = api[str(node["id"])]["inputs"]
        if node["type"] == "IDDMTrain":
            order = list(spec.LEGACY_TRAIN_WIDGETS)
        else:
            order = []
            for name, d in defs[node["type"]]["inputs"].items():
                if d["type"] in wg.WIDGET_TYPES:
                    order += [name, "control_after_generate"] if d.get("control_after_generate") else [name]
        node["widgets_values"] = ["fixed" if name == "control_after_generate" else inputs[name] for name in order]
    return ui


@needs_chromium
def test_an_old_ui_graph_is_read_by_name_and_runs(site, tmp_path):
    """Pack 0.1's UI file on today's page: IDDM Train gets its values by name and an IDDM Train
    Options node the moved ones; what the page queues runs."""
    server, base, _ = site
    api = cf.tiny_run(json.loads((LEGACY / "train_and_generate_0.1_api.json").read_text()),
                      wg.PHOTO_FOLDER, f"_{RUN}_old_ui")
    api["1"]["inputs"]["ckpt_name"] = cf.CHECKPOINT_NAME
    api["6"]["inputs"].update(ft_steps=3, rank=2, rho=0.5)
    workflow = tmp_path / "old.json"
    workflow.write_text(json.dumps(legacy_ui(api)))
    page = browser(HERE / "browser_check.py", server.url, workflow, "--prompt")
    prompt = page["prompt"]
    options = [node for node in prompt.values() if node["class_type"] == "IDDMTrainOptions"]
    assert len(options) == 1 and prompt["6"]["inputs"]["options"][0] in prompt
    moved = {name: api["6"]["inputs"][name] for name in spec.train_option_names()}
    assert options[0]["inputs"] == moved
    front = {name: prompt["6"]["inputs"][name] for name in ("rho", "iterations", "lora_name", "seed")}
    assert front == {name: api["6"]["inputs"][name] for name in front}
    assert [e for e in page["console_errors"] if "iddm" in e.lower()] == []
    cf.run_graph(server, prompt)
    settings = lora_settings(base, f"iddm_test_{RUN}_old_ui_6")
    assert (settings["ft_steps"], settings["rank"], settings["rho"]) == (3, 2, 0.5)


@needs_chromium
def test_the_live_chart_during_and_after_a_run(site, tmp_path):
    """Two iterations of the shipped graph queued from the page: each series is one line across both
    iterations on its own scale, and the final figures appear when the run ends."""
    server, _, folder = site
    defs = wg.node_definitions()
    api = cf.tiny_run(wg.train_and_generate(defs), wg.PHOTO_FOLDER, f"_{RUN}_chart")
    api["1"]["inputs"]["ckpt_name"] = cf.CHECKPOINT_NAME
    api["6"]["inputs"]["iterations"] = 2
    api["9"]["inputs"].update(pgd_steps=4)  # rho 0.3: 1 Stage I and 3 Stage II steps per iteration
    workflow = tmp_path / "chart.json"
    workflow.write_text(json.dumps(wg.to_ui(api, defs)))
    shot = keep(folder, "iddm_chart.png")
    state = browser(HERE / "browser_check.py", server.url, workflow, shot)
    assert [e for e in state["console_errors"] if "iddm" in e.lower()] == []
    assert state["points"] == state["total"] == 2 * (2 + 4 + 2) and state["iterations"] == 2
    for key, count in (("stage1", 2), ("stage2", 6), ("ft", 8)):
        series = state["series"][key]
        assert series["points"] == count
        assert series["x"][0] < 1 < series["x"][1] <= 2, (key, series)  # one line over both iterations
    assert state["stage2_pixels"] > 20
    status, figures = state["header"]
    assert status.startswith("done: 2 iteration(s), 16 steps") and "PSNR" in figures and "→" in figures
    assert shot.is_file() and shot.with_name(shot.stem + "_chart.png").is_file()
    if state["during_screenshot"]:  # best effort: a fast machine may finish between two looks
        assert shot.with_name(shot.stem + "_during_chart.png").is_file()
