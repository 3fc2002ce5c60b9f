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
API_OF_UI = {wg.ui_path(name): wg.WORKFLOWS / "api" / f"{name}.json" for name in wg.GRAPHS}


def test_the_three_workflows_ship_in_both_formats():
    assert {p.stem for p in API_FILES} == set(wg.GRAPHS) == set(wg.TEMPLATES)
    assert set(UI_FILES) == set(API_OF_UI)  # the UI files are named by their template titles


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
    api = json.loads(API_OF_UI[path].read_text())
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
    ui = json.loads(wg.ui_path("iddm_train_and_generate").read_text())
    train = next(n for n in ui["nodes"] if n["type"] == "IDDMTrain")
    train["widgets_values"].append(1)
    with pytest.raises(ValueError, match="too many"):
        wg.ui_to_api(ui, DEFS)


def test_a_loader_of_the_lora_trained_in_the_graph_holds_a_listed_value():
    """comfy-cli refuses a dropdown value the server does not list: "" was such a value."""
    for path in API_FILES:
        for node in json.loads(path.read_text()).values():
            if node["class_type"] == "IDDMLoadProtectedLoRA" and "lora" in node["inputs"]:
                assert node["inputs"]["lora_name"] == wg.CONNECTED_LORA, path.name


def _boxes(ui: dict) -> dict[int, tuple[float, float, float, float]]:
    """Each node's box on the canvas, its title bar (30 px above pos) included."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in ui["nodes"]}


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_workflows_read_left_to_right_without_overlaps(path):
    ui = json.loads(path.read_text())
    boxes = _boxes(ui)
    nodes = {n["id"]: n for n in ui["nodes"]}
    ids = sorted(boxes)
    assert not [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if _overlap(boxes[a], boxes[b])]
    for _, source, _, target, _, _ in ui["links"]:  # every link runs from left to right
        assert boxes[source][2] < boxes[target][0], (nodes[source]["title"], nodes[target]["title"])
    for node in ui["nodes"]:  # what the canvas draws fits: no node grows over its neighbour
        assert node["size"][1] >= wg._height(node["type"], DEFS[node["type"]])
        if node["type"] == "IDDMTrain":
            assert node["size"][1] <= 650  # was over 1000 px with every setting on it


def test_the_privacy_sweep_has_one_lane_per_rho():
    ui = json.loads(wg.ui_path("iddm_privacy_sweep").read_text())
    api = json.loads((wg.WORKFLOWS / "api" / "iddm_privacy_sweep.json").read_text())
    boxes = _boxes(ui)
    groups = ui["groups"]
    assert [g["title"] for g in groups] == [api[t]["_meta"]["title"] for t in ("6", "7", "8")]
    for lane, group in enumerate(groups):
        x, y, w, h = group["bounding"]
        members = [int(n) for n in api if n == str(6 + lane) or str(int(n) // 10) == str(lane + 1)]
        assert len(members) == 8  # IDDM Train and its seven nodes from LoRA to saved portraits
        for member in members:
            left, top, right, bottom = boxes[member]
            assert x <= left and right <= x + w and y <= top and bottom <= y + h, (group["title"], member)
        # a lane is one row: its nodes side by side, not stacked into a tall column
        assert h < 800
    for a, b in zip(groups, groups[1:]):
        assert a["bounding"][1] + a["bounding"][3] <= b["bounding"][1]


def test_node_heights_follow_the_web_extensions_panels():
    chart = (wg.REPO / "web" / "train_chart.js").read_text()
    assert wg.PANELS["IDDMTrain"] == int(re.search(r"CHART_HEIGHT = (\d+)", chart).group(1)) + 4


def test_templates_have_titles_descriptions_and_thumbnails():
    from PIL import Image, ImageStat

    for name, template in wg.TEMPLATES.items():
        # The card shows two lines of title and two of description, about 20 and 32 characters each.
        assert len(template.title) <= 40 and " " in template.title
        assert template.description != template.title and len(template.description) <= 64
        thumbnail = wg.ui_path(name).with_suffix(".jpg")
        assert thumbnail.is_file(), (f"{thumbnail.name} is missing: make it with tests/comfyui/template_browser.py "
                                     "COMFY_URL thumbnails workflows (a server with this checkout)")
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and image.size[0] == image.size[1] >= 256  # the card is square
            spread = ImageStat.Stat(image.convert("L")).stddev[0]
        assert spread > 8, f"{thumbnail.name} looks blank"  # a graph on the dark canvas: about 15-25
    assert (wg.REPO / "web" / "templates.js").read_text() == wg.templates_js()
    locales = json.loads((wg.REPO / "locales" / "en" / "main.json").read_text())
    assert locales["templateWorkflows"]["category"]["comfyui-iddm"] == "IDDM privacy"


def test_protect_photos_workflow_saves_the_cloaked_photos_with_pixels_only():
    api = json.loads((wg.WORKFLOWS / "api" / "iddm_protect_photos_before_posting.json").read_text())
    by_kind = {n["class_type"]: (node_id, n) for node_id, n in api.items()}
    cloak_id, cloak = by_kind["IDDMCloakPhotos"]
    assert cloak["inputs"]["images"] == [by_kind["IDDMLoadPrivatePhotos"][0], 0]
    assert cloak["inputs"]["method"] == "aspl" and cloak["inputs"]["model"][0] == by_kind["CheckpointLoaderSimple"][0]
    assert by_kind["IDDMSavePublicImage"][1]["inputs"]["images"] == [cloak_id, 0]
    # nothing else writes the photos anywhere: no stock saver (metadata), no preview (temp/ is served)
    assert set(by_kind) == {"CheckpointLoaderSimple", "IDDMLoadPrivatePhotos", "IDDMCloakPhotos", "IDDMSavePublicImage"}
