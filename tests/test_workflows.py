"""The shipped workflows, checked without ComfyUI against the nodes' declarations."""
from __future__ import annotations

import copy
import json
import re

import pytest

import workflow_graphs as wg

DEFS = wg.node_definitions()
API_FILES = sorted((wg.WORKFLOWS / "api").glob("*.json"))
UI_FILES = sorted(wg.WORKFLOWS.glob("*.json"))


def test_the_three_workflows_ship_in_both_formats():
    names = {p.stem for p in API_FILES}
    assert names == set(wg.GRAPHS) == {p.stem for p in UI_FILES}


def test_shipped_files_are_what_the_graph_description_renders():
    """Edit tests/workflow_graphs.py and run it; never hand-edit one format only."""
    for path, data in wg.render_all().items():
        assert path.read_text() == wg.dump(data), f"{path.name} is stale: run python tests/workflow_graphs.py"


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_api_workflow_is_valid(path):
    assert wg.validate_api(json.loads(path.read_text()), DEFS) == []


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_is_the_same_valid_graph(path):
    ui = json.loads(path.read_text())
    api = json.loads((wg.WORKFLOWS / "api" / path.name).read_text())
    assert wg.ui_to_api(ui, DEFS) == api
    nodes = {n["id"]: n for n in ui["nodes"]}
    for link_id, source, slot, target, target_slot, kind in ui["links"]:
        assert nodes[source]["outputs"][slot]["type"] == kind
        assert link_id in nodes[source]["outputs"][slot]["links"]
        assert nodes[target]["inputs"][target_slot] == {"name": nodes[target]["inputs"][target_slot]["name"],
                                                         "type": kind, "link": link_id}
    assert ui["last_link_id"] == len(ui["links"]) and ui["last_node_id"] == max(nodes)


def test_train_and_generate_wires_the_whole_story():
    api = json.loads((wg.WORKFLOWS / "api" / "iddm_train_and_generate.json").read_text())
    kinds = [n["class_type"] for n in api.values()]
    for kind in ("CheckpointLoaderSimple", "IDDMLoadPrivatePhotos", "IDDMSplitReferenceProtection", "IDDMTrain",
                 "IDDMLoadProtectedLoRA", "CLIPTextEncode", "KSampler", "VAEDecode", "IDDMIdentitySimilarity",
                 "IDDMSavePublicImage"):
        assert kind in kinds
    assert "SaveImage" not in kinds  # the stock saver embeds the graph in every PNG
    sweep = json.loads((wg.WORKFLOWS / "api" / "iddm_privacy_sweep.json").read_text())
    rhos = sorted(n["inputs"]["rho"] for n in sweep.values() if n["class_type"] == "IDDMTrain")
    assert rhos == [0.1, 0.3, 0.5]


def test_workflows_hold_no_paths_or_personal_names():
    for path in API_FILES + UI_FILES:
        text = path.read_text()
        assert not re.search(r'"(/|~|[A-Za-z]:\\\\)', text), f"{path.name} holds an absolute path"
        assert "/home/" not in text and "\\\\Users\\\\" not in text


def _first(api, kind):
    return next(node_id for node_id, node in api.items() if node["class_type"] == kind)


@pytest.mark.parametrize("break_it,expected", [
    (lambda g: g.__setitem__("99", {"class_type": "NoSuchNode", "inputs": {}}), "unknown node type"),
    (lambda g: g[_first(g, "IDDMTrain")]["inputs"].__setitem__("rho", 1.5), "above the maximum"),
    (lambda g: g[_first(g, "IDDMTrain")]["inputs"].__setitem__("iterations", 2.5), "not a whole number"),
    (lambda g: g[_first(g, "IDDMTrainOptions")]["inputs"].__setitem__("mixed_precision", "fp8"), "not one of"),
    (lambda g: g[_first(g, "IDDMTrain")]["inputs"].__setitem__("reference", ["1", 0]), "wants IMAGE but gets MODEL"),
    (lambda g: g[_first(g, "IDDMTrain")]["inputs"].pop("vae"), "required input 'vae' missing"),
    (lambda g: g[_first(g, "KSampler")]["inputs"].__setitem__("latent_image", ["4", 3]), "links to output 3"),
    (lambda g: g[_first(g, "IDDMTrain")]["inputs"].__setitem__("typo", 1), "unknown input 'typo'"),
])
def test_validator_catches_broken_graphs(break_it, expected):
    api = copy.deepcopy(json.loads((wg.WORKFLOWS / "api" / "iddm_train_and_generate.json").read_text()))
    break_it(api)
    problems = wg.validate_api(api, DEFS)
    assert any(expected in p for p in problems), problems


def test_ui_reader_refuses_a_wrong_widget_count():
    ui = json.loads((wg.WORKFLOWS / "iddm_train_and_generate.json").read_text())
    train = next(n for n in ui["nodes"] if n["type"] == "IDDMTrain")
    train["widgets_values"].append(1)
    with pytest.raises(ValueError, match="too many"):
        wg.ui_to_api(ui, DEFS)
