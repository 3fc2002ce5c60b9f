"""IDDM Cloak Photos on a real ComfyUI server (CPU, the tiny random-weight SD1.5 checkpoint): the
shipped workflow "protect photos before posting" runs (scaled down) and saves pixel-only images within
the budget of the photos' crops; noise needs no model; aspl without one is refused by name; a RID
network put into models/iddm_rid (the small architecture, random weights) is listed and cloaks without
a model within the budget, its report naming no file; rid with no network chosen, or with a file that
is not a network, is refused naming the folder as ComfyUI does; /history holds no absolute path.

Runs only when $COMFYUI_PATH points at a ComfyUI checkout (tests/comfyui/README.md).
"""
from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import comfyui_fixtures as cf  # noqa: E402
import pack_nodes  # noqa: E402
import workflow_graphs as wg  # noqa: E402
from conftest import png_chunk_types, random_rid_network  # noqa: E402

pytestmark = cf.comfyui_marks("run IDDM Cloak Photos on a real ComfyUI server")
RUN = uuid.uuid4().hex[:6]
PHOTOS = f"iddm_cloak_{RUN}"
WORKFLOW = "iddm_protect_photos_before_posting"
BUDGET = 0.025  # eta 0.05 in [-1,1] units
spec = pack_nodes.load("spec")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with cf.pack_server(tmp_path_factory.mktemp("comfy"), PHOTOS, f"iddm_test_{RUN}") as server:
        yield server


def saved(server, entry: dict, node_id: str) -> list[Path]:
    images = entry["outputs"][node_id]["images"]
    return [server.output_dir / image["subfolder"] / image["filename"] for image in images]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float64) / 255.0


def assert_cloaked_within_budget(cloaked: list[Path], originals: list[Path]) -> None:
    """Every photo saved with pixels only, changed, and by no more than the budget (plus PNG rounding)."""
    assert len(cloaked) == len(originals) >= 4
    for mine, original in zip(cloaked, originals):
        assert png_chunk_types(mine.read_bytes()) == [b"IHDR", b"IDAT", b"IEND"]
        change = np.abs(pixels(mine) - pixels(original))
        assert change.max() <= BUDGET + 1 / 255 and change.max() > 0


def graph(method: str, prefix: str, with_model: bool = True) -> dict:
    """The shipped workflow, scaled down; `method` and the save prefix set; without the model if asked."""
    api = cf.tiny_run(json.loads((wg.WORKFLOWS / "api" / f"{WORKFLOW}.json").read_text()), PHOTOS, RUN)
    cloak = next(node for node in api.values() if node["class_type"] == "IDDMCloakPhotos")
    cloak["inputs"]["method"] = method
    save = next(node for node in api.values() if node["class_type"] == "IDDMSavePublicImage")
    save["inputs"]["filename_prefix"] = prefix
    if not with_model:
        for name in ("model", "clip", "vae"):
            cloak["inputs"].pop(name)
        api = {k: v for k, v in api.items() if v["class_type"] != "CheckpointLoaderSimple"}
    return api


def save_id(api: dict) -> str:
    return next(k for k, v in api.items() if v["class_type"] == "IDDMSavePublicImage")


def test_protect_photos_workflow_saves_cloaked_pixels_only(server):
    api = graph("aspl", f"cloaked_{RUN}")
    cloaked = saved(server, cf.run_graph(server, api), save_id(api))
    plain_api = graph("none", f"plain_{RUN}", with_model=False)
    originals = saved(server, cf.run_graph(server, plain_api), save_id(plain_api))
    assert_cloaked_within_budget(cloaked, originals)
    assert PHOTOS not in server.log().split("Starting server")[-1]  # the folder's name is not logged


def test_noise_needs_no_model_and_aspl_without_one_is_refused(server):
    api = graph("noise", f"noise_{RUN}", with_model=False)
    assert saved(server, cf.run_graph(server, api), save_id(api))
    refused = server.wait(server.queue(graph("aspl", f"refused_{RUN}", with_model=False)))
    errors = cf.execution_errors(refused)
    assert errors and "needs the model it protects against" in errors[0]["exception_message"]


@pytest.fixture
def rid_folder():
    """ComfyUI's models/iddm_rid; what the test puts there is removed afterwards (the folder too if
    the test made it)."""
    folder = cf.comfyui_path() / "models" / spec.RID_FOLDER
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        for path in folder.glob(f"iddm_test_{RUN}*"):
            path.unlink()
        if made and not any(folder.iterdir()):
            folder.rmdir()


def rid_graph(network: str, prefix: str) -> dict:
    """The shipped workflow with method rid and `network` chosen, no model, and the node's report
    shown by the stock Preview Any (so /history keeps it)."""
    api = graph("rid", prefix, with_model=False)
    cloak_id = next(k for k, v in api.items() if v["class_type"] == "IDDMCloakPhotos")
    api[cloak_id]["inputs"]["rid_weights"] = network
    api["90"] = {"class_type": "PreviewAny", "inputs": {"source": [cloak_id, 1]}}
    return api


def forbidden_paths() -> list[str]:
    """Absolute paths /history must not hold: the ComfyUI base (and so models/) and the home folder."""
    return [str(cf.comfyui_path()), os.path.realpath(cf.comfyui_path()), str(Path.home()) + "/"]


def test_a_rid_network_in_models_cloaks_without_a_model_within_the_budget(server, rid_folder):
    network = random_rid_network(rid_folder / f"iddm_test_{RUN}_rid.safetensors")
    info = server.get("/object_info/IDDMCloakPhotos")["IDDMCloakPhotos"]["input"]["optional"]
    assert info["rid_weights"][1]["options"][0] == spec.NO_RID_NETWORK
    assert network.name in info["rid_weights"][1]["options"]
    api = rid_graph(network.name, f"rid_{RUN}")
    entry = cf.run_graph(server, api)
    cloaked = saved(server, entry, save_id(api))
    plain_api = graph("none", f"rid_plain_{RUN}", with_model=False)
    originals = saved(server, cf.run_graph(server, plain_api), save_id(plain_api))
    assert_cloaked_within_budget(cloaked, originals)
    report_text = "".join(entry["outputs"]["90"]["text"])
    report = json.loads(report_text)
    assert report["method"] == "rid" and report["figures"]["linf"] <= BUDGET + 1e-5
    assert report["figures"]["trained_eta_0_1"] == pytest.approx(BUDGET)  # the network's header
    assert network.stem not in report_text and spec.RID_FOLDER not in report_text  # settings and figures only
    assert cf.absolute_paths_in(entry, forbidden_paths()) == []
    assert cf.absolute_paths_in(server.get(f"/history/{entry['prompt'][1]}"), forbidden_paths()) == []


def test_rid_without_a_network_or_with_a_file_that_is_not_one_is_refused(server, rid_folder):
    broken = rid_folder / f"iddm_test_{RUN}_broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    cases = {"no network chosen": (spec.NO_RID_NETWORK, f"put one in models/{spec.RID_FOLDER}"),
             "not a network": (broken.name, f"{broken.name} is not a readable safetensors file")}
    for case, (network, expected) in cases.items():
        failed = server.wait(server.queue(rid_graph(network, f"rid_refused_{RUN}")))
        assert failed["status"]["status_str"] == "error", case
        message = json.dumps([e["exception_message"] for e in cf.execution_errors(failed)])
        assert expected in message, (case, message)
        assert cf.absolute_paths_in(failed, forbidden_paths()) == [], case
        assert cf.absolute_paths_in(server.get(f"/history/{failed['prompt'][1]}"), forbidden_paths()) == [], case
    assert not list(server.output_dir.glob(f"rid_refused_{RUN}*"))  # refused before any image was saved
