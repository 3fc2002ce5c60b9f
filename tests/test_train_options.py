"""IDDM Train with the design card's knobs up front and IDDM Train Options for the rest; graphs
written before the split (pack 0.1) keep their settings. No ComfyUI needed."""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import pack_nodes
import workflow_graphs as wg

spec = pack_nodes.load("spec")
train_options = pack_nodes.load("train_options")
LEGACY = Path(__file__).with_name("data") / "legacy_workflows"
LEGACY_API = json.loads((LEGACY / "train_and_generate_0.1_api.json").read_text())
LEGACY_UI = json.loads((LEGACY / "train_and_generate_0.1_ui.json").read_text())
FRONT = ["rho", "eta", "tau", "iterations", "lora_name", "seed", "resume"]


def widgets(node) -> list[str]:
    return [p.name for p in node.inputs if p.is_widget]


def test_iddm_train_shows_the_design_cards_knobs_and_the_options_node_the_rest():
    assert widgets(spec.TRAIN) == FRONT
    legacy = set(spec.LEGACY_TRAIN_WIDGETS) - {"control_after_generate"}
    assert set(FRONT) | set(widgets(spec.TRAIN_OPTIONS)) == legacy  # every setting of pack 0.1 has a home
    assert not set(FRONT) & set(widgets(spec.TRAIN_OPTIONS))
    assert spec.TRAIN.input("options").type == spec.TRAIN_OPTIONS.outputs[0].type == "IDDM_OPTIONS"
    assert spec.TRAIN.input("options").optional


def test_the_legacy_widget_list_is_the_order_pack_0_1_saved():
    train = next(n for n in LEGACY_UI["nodes"] if n["type"] == "IDDMTrain")
    values = dict(zip(spec.LEGACY_TRAIN_WIDGETS, train["widgets_values"]))
    api = LEGACY_API["6"]["inputs"]
    assert len(train["widgets_values"]) == len(spec.LEGACY_TRAIN_WIDGETS)
    assert {k: v for k, v in values.items() if k != "control_after_generate"} == \
        {k: v for k, v in api.items() if not wg._is_link(v)}


def test_a_graph_without_options_trains_with_the_settings_it_had_before():
    """Pack 0.1's graphs held every default on IDDM Train: without the options node and without
    those inputs, the defaults are the same values."""
    before = LEGACY_API["6"]["inputs"]
    settings = train_options.train_settings(None, {})
    assert settings == {name: before[name] for name in spec.train_option_names()}


def test_the_options_node_supplies_its_values():
    values = {**train_options.default_options(), "ft_steps": 3, "overwrite": True, "face_detector": "none"}
    settings = train_options.train_settings(train_options.TrainOptions(values), {})
    assert settings["ft_steps"] == 3 and settings["overwrite"] is True and settings["face_detector"] == "none"
    with pytest.raises(ValueError, match="missing"):
        train_options.TrainOptions({"ft_steps": 3})


def test_an_old_api_graph_keeps_the_settings_it_gives_iddm_train_itself():
    prompt = copy.deepcopy(LEGACY_API)
    prompt["6"]["inputs"].update(ft_steps=5, pgd_steps=3, overwrite=True, pixel_range="0,1")
    own = train_options.own_inputs(prompt, "6")
    settings = train_options.train_settings(None, own)
    assert (settings["ft_steps"], settings["pgd_steps"], settings["overwrite"], settings["pixel_range"]) == \
        (5, 3, True, "0,1")
    # A value given on IDDM Train itself wins over a connected options node (API users may do either).
    options = train_options.TrainOptions({**train_options.default_options(), "ft_steps": 9, "rank": 8})
    both = train_options.train_settings(options, {"ft_steps": 5})
    assert both["ft_steps"] == 5 and both["rank"] == 8
    assert train_options.own_inputs(prompt, "99") == {} and train_options.own_inputs(None, "6") == {}


@pytest.mark.parametrize("name,value,message", [
    ("ft_steps", ["12", 0], "connect it to the ft_steps input of an IDDM Train Options node"),
    ("ft_steps", "20", "is not a whole number"),
    ("ft_steps", True, "is not a whole number"),
    ("lr", "1e-4", "is not a number"),
    ("overwrite", 1, "is not true or false"),
    ("face_detector", "mtcnn", "is not one of"),
    ("instance_prompt", 5, "is not text"),
])
def test_old_style_inputs_that_cannot_be_used_are_refused_by_name(name, value, message):
    with pytest.raises(ValueError, match=message) as refused:
        train_options.train_settings(None, {name: value})
    assert name in str(refused.value)


def test_load_protected_lora_lists_an_entry_for_the_connected_lora_first():
    port = spec.LOAD_LORA.input("lora_name")
    assert port.options == (spec.CONNECTED_LORA,) and port.default == spec.CONNECTED_LORA
    assert port.options_from == spec.LORA_FILES
    assert not spec.CONNECTED_LORA.endswith((".safetensors", ".ckpt", ".pt"))  # never a listed file


NODE_SCRIPT = """
import { migrateLegacyTrainNodes } from %s;
const graph = JSON.parse(await new Promise((ok) => { let s = ""; process.stdin.on("data", (d) => s += d);
                                                     process.stdin.on("end", () => ok(s)); }));
const count = migrateLegacyTrainNodes(graph, %s);
console.log(JSON.stringify({ count, graph }));
"""


def run_migration(graph: dict) -> tuple[int, dict]:
    names = [p.name for p in spec.TRAIN.inputs]
    module = json.dumps((pack_nodes.REPO / "web" / "legacy_graphs.js").as_uri())
    result = subprocess.run(["node", "--input-type=module", "-e", NODE_SCRIPT % (module, json.dumps(names))],
                            input=json.dumps(graph), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    return out["count"], out["graph"]


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run web/legacy_graphs.js")
def test_an_old_ui_graph_is_read_by_name_before_the_canvas_places_its_values():
    ui = copy.deepcopy(LEGACY_UI)
    train = next(n for n in ui["nodes"] if n["type"] == "IDDMTrain")
    legacy = list(spec.LEGACY_TRAIN_WIDGETS)
    train["widgets_values"][legacy.index("ft_steps")] = 5
    train["widgets_values"][legacy.index("lora_name")] = "iddm_20260101_abcdef"
    # As ComfyUI's frontend saves it: an input entry per widget, one of them linked to another node.
    train["inputs"] += [{"name": name, "type": "INT", "widget": {"name": name}, "link": None}
                        for name in ("rho", "pgd_steps")]
    train["inputs"].append({"name": "rank", "type": "INT", "widget": {"name": "rank"}, "link": 99})
    ui["links"].append([99, 4, 0, 6, len(train["inputs"]) - 1, "INT"])
    source = next(n for n in ui["nodes"] if n["id"] == 4)
    source["outputs"][0]["links"].append(99)

    count, migrated = run_migration(ui)
    assert count == 1
    node = next(n for n in migrated["nodes"] if n["type"] == "IDDMTrain")
    assert node["widgets_values"] == []  # the canvas must not place them by position
    stash = node["properties"]["iddm_legacy"]
    assert stash["values"]["ft_steps"] == 5 and stash["values"]["lora_name"] == "iddm_20260101_abcdef"
    assert stash["values"]["rho"] == 0.3 and len(stash["values"]) == len(legacy)
    assert stash["links"] == {"rank": [4, 0]}  # moved to the options node once it exists
    names = [i["name"] for i in node["inputs"]]
    assert "pgd_steps" not in names and "rank" not in names and "rho" in names and "reference" in names
    assert all(link[0] != 99 for link in migrated["links"]) and 99 not in \
        next(n for n in migrated["nodes"] if n["id"] == 4)["outputs"][0]["links"]
    # Graphs of the current layout are left alone.
    current = json.loads(wg.ui_path("iddm_train_and_generate").read_text())
    assert run_migration(current) == (0, current)


def test_the_web_extension_reads_old_graphs_with_the_same_widget_list():
    source = (pack_nodes.REPO / "web" / "legacy_graphs.js").read_text()
    listed = source.split("LEGACY_TRAIN_WIDGETS = [", 1)[1].split("];", 1)[0]
    assert tuple(re.findall(r'"(\w+)"', listed)) == spec.LEGACY_TRAIN_WIDGETS
