"""IDDM Cloak Photos on a real ComfyUI server (CPU, the tiny random-weight SD1.5 checkpoint): the
shipped workflow "protect photos before posting" runs (scaled down) and saves pixel-only images within
the budget of the photos' crops; noise needs no model; aspl without one is refused by name.

Runs only when $COMFYUI_PATH points at a ComfyUI checkout (tests/comfyui/README.md).
"""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import comfyui_fixtures as cf  # noqa: E402
import workflow_graphs as wg  # noqa: E402

pytestmark = cf.comfyui_marks("run IDDM Cloak Photos on a real ComfyUI server")
RUN = uuid.uuid4().hex[:6]
PHOTOS = f"iddm_cloak_{RUN}"
WORKFLOW = "iddm_protect_photos_before_posting"
BUDGET = 0.025  # eta 0.05 in [-1,1] units


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with cf.pack_server(tmp_path_factory.mktemp("comfy"), PHOTOS, f"iddm_test_{RUN}") as server:
        yield server


def saved(server, entry: dict, node_id: str) -> list[Path]:
    images = entry["outputs"][node_id]["images"]
    return [server.output_dir / image["subfolder"] / image["filename"] for image in images]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float64) / 255.0


def png_chunks(path: Path) -> list[bytes]:
    data, chunks, at = path.read_bytes(), [], 8
    while at < len(data):
        chunks.append(data[at + 4:at + 8])
        at += 12 + int.from_bytes(data[at:at + 4], "big")
    return chunks


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
    assert len(cloaked) == len(originals) >= 4
    for mine, original in zip(cloaked, originals):
        assert png_chunks(mine) == [b"IHDR", b"IDAT", b"IEND"]
        change = np.abs(pixels(mine) - pixels(original))
        assert change.max() <= BUDGET + 1 / 255 and change.max() > 0
    assert PHOTOS not in server.log().split("Starting server")[-1]  # the folder's name is not logged


def test_noise_needs_no_model_and_aspl_without_one_is_refused(server):
    api = graph("noise", f"noise_{RUN}", with_model=False)
    assert saved(server, cf.run_graph(server, api), save_id(api))
    refused = server.wait(server.queue(graph("aspl", f"refused_{RUN}", with_model=False)))
    errors = cf.execution_errors(refused)
    assert errors and "needs the model it protects against" in errors[0]["exception_message"]
