"""The ComfyUI door without ComfyUI: node declarations, conversions at the door, the entry point's
behaviour on a ComfyUI too old for V3 nodes. (tests/comfyui/ checks the rest on a real server.)"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch

import pack_nodes
from comfyui_iddm.config import KNOBS, IDDMConfig

spec = pack_nodes.load("spec")
convert = pack_nodes.load("convert")

NODE_IDS = ["IDDMLoadPrivatePhotos", "IDDMSplitReferenceProtection", "IDDMTrain",
            "IDDMIdentitySimilarity", "IDDMLoadProtectedLoRA"]
TRAIN_PORTS = spec.TRAIN.inputs + spec.TRAIN_OPTIONS.inputs  # IDDM Train and its options node


def test_node_ids_are_the_stable_ones_workflows_depend_on():
    ids = [node.node_id for node in spec.ALL_NODES]
    assert ids[:5] == NODE_IDS and len(set(ids)) == len(ids)


def test_every_input_and_output_explains_itself_to_a_newcomer():
    for node in spec.ALL_NODES:
        assert len(node.description) > 60, node.node_id
        names = [p.name for p in node.inputs]
        assert len(set(names)) == len(names), node.node_id
        for port in node.inputs + node.outputs:
            assert len(port.tooltip) > 15, f"{node.node_id}.{port.name} has no real tooltip"


def test_knob_tooltips_and_defaults_come_from_the_engine_config():
    defaults = IDDMConfig()
    for port in TRAIN_PORTS:
        if port.name in KNOBS:
            assert port.tooltip == KNOBS[port.name].help
            expected = getattr(defaults, port.name)
            if isinstance(expected, tuple):
                expected = ",".join(map(str, expected))
            assert port.default == expected, port.name


def test_train_nodes_expose_every_knob_except_the_ones_the_door_decides():
    fields = {f.name for f in dataclasses.fields(IDDMConfig)}
    # resolution is the size of the incoming crops.
    assert set(spec.train_config_names()) == fields - {"resolution"}


def test_train_node_defaults_make_a_valid_config():
    values = {p.name: p.default for p in TRAIN_PORTS if p.name in spec.train_config_names()}
    config = IDDMConfig(resolution=512, **values)
    assert config.rho == 0.3 and config.recognizers == ("auto",) and config.stage2_timesteps == (0, 200)


def test_widget_defaults_lie_inside_their_own_limits():
    for node in spec.ALL_NODES:
        for port in node.inputs:
            if port.type in ("INT", "FLOAT") and port.default is not None:
                assert port.min <= port.default <= port.max, f"{node.node_id}.{port.name}"
            if port.type == "COMBO" and port.options:
                assert port.default in port.options, f"{node.node_id}.{port.name}"
            if port.type == "COMBO":
                assert port.options or port.options_from, f"{node.node_id}.{port.name} has no choices"


def test_open_lower_limits_stay_above_zero():
    for name in ("tau", "pgd_alpha", "lr", "lora_alpha"):
        port = next(p for p in TRAIN_PORTS if p.name == name)
        assert port.min > 0
        IDDMConfig(**{name: port.min})  # the smallest value the widget allows is a valid config


def test_image_conversion_round_trip_and_layouts():
    comfy = torch.rand(2, 16, 24, 3)
    engine = convert.comfy_to_engine(comfy)
    assert engine.shape == (2, 3, 16, 24) and engine.dtype == torch.float32
    assert torch.equal(engine[1, 2], comfy[1, :, :, 2])
    assert torch.equal(convert.engine_to_comfy(engine), comfy)
    rgba = torch.rand(1, 8, 8, 4)
    assert torch.equal(convert.comfy_to_engine(rgba), rgba[..., :3].permute(0, 3, 1, 2))
    grey = torch.rand(1, 8, 8, 1)
    assert torch.equal(convert.comfy_to_engine(grey)[0, 1], grey[0, :, :, 0])
    with pytest.raises(ValueError, match=r"\[B,H,W,C\]"):
        convert.comfy_to_engine(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        convert.engine_to_comfy(torch.rand(1, 8, 8, 3))


def test_images_from_inference_mode_can_be_trained_on():
    with torch.inference_mode():  # how ComfyUI hands IMAGE tensors to a node
        comfy = torch.rand(1, 8, 8, 3)
    engine = convert.comfy_to_engine(comfy)
    assert not engine.is_inference()
    x = engine.requires_grad_(True)
    (x * 2).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


@pytest.mark.parametrize("name,expected", [("iddm_20260101_abc123", "iddm_20260101_abc123.safetensors"),
                                           ("my lora.v2.safetensors", "my lora.v2.safetensors")])
def test_lora_names_become_plain_file_names(name, expected):
    assert convert.lora_file_name(name) == expected


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "/abs", "", ".hidden", "x..y"])
def test_lora_names_that_could_escape_models_loras_are_refused(name):
    with pytest.raises(ValueError, match="plain file name"):
        convert.lora_file_name(name)


def test_photo_report_names_photos_by_number_only():
    from comfyui_iddm.photos import PhotoIssue

    issues = [PhotoIssue(2, "anna_beach.jpg", "no face found (skipped)"),
              PhotoIssue(None, "notes.txt", "not an image file (skipped)")]
    report = convert.photo_report(5, issues)
    assert report.splitlines() == ["5 photo(s) usable.", "photo 3: no face found (skipped)",
                                   "one file: not an image file (skipped)"]
    assert "anna" not in report and "notes" not in report
    named = convert.photo_report(5, issues, show_names=True)  # local debugging only
    assert named.splitlines()[1:] == ["anna_beach.jpg: no face found (skipped)",
                                      "notes.txt: not an image file (skipped)"]


def test_iddm_lora_knows_its_surrogates_from_the_metadata():
    from comfyui_iddm.lora_io import lora_metadata

    config = IDDMConfig(recognizers="auto")
    figures = {"identity": {"surrogate": {"dlib_resnet": {"before": 0.9, "after": 0.5}},
                            "held-out": {"arcface": {"before": 0.8, "after": 0.7}}}}
    lora = convert.IddmLora("x.safetensors", {}, lora_metadata(config, figures))
    assert lora.surrogates() == ("dlib_resnet",)
    named = convert.IddmLora("y.safetensors", {}, lora_metadata(IDDMConfig(recognizers="irse50,facenet"), {}))
    assert named.surrogates() == ("irse50", "facenet")
    assert convert.IddmLora("z", {}, {}).surrogates() == ()


def test_labelled_grid_puts_each_label_under_its_image():
    annotate = pack_nodes.load("annotate")
    images = torch.zeros(3, 3, 32, 40)
    images[1] = 1.0
    grid = annotate.labelled_grid(images, ["0.12", "no face", "0.98"], columns=2)
    band = 14
    assert grid.shape == (1, 3, 2 * (32 + band), 2 * 40)
    assert torch.all(grid[0, :, :32, 40:80] == 1.0)  # image 1, top right
    caption = grid[0, :, 32:32 + band, :40]
    assert caption.min() < 0.5 < caption.max()  # dark text on the white band
    with pytest.raises(ValueError, match="labels"):
        annotate.labelled_grid(images, ["a"])


def test_old_comfyui_gets_a_message_not_a_traceback(tmp_path):
    """Without comfy_api.latest the pack imports, logs what to do, and offers no nodes."""
    script = textwrap.dedent(f"""
        import importlib.util, logging, sys
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        sys.modules["comfy_api"] = None  # as in a ComfyUI older than the V3 API
        spec = importlib.util.spec_from_file_location("pack", {str(pack_nodes.REPO / '__init__.py')!r},
                                                      submodule_search_locations=[{str(pack_nodes.REPO)!r}])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print("MAPPINGS", module.NODE_CLASS_MAPPINGS, hasattr(module, "comfy_entrypoint"), module.WEB_DIRECTORY)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "MAPPINGS {} False ./web" in result.stdout
    assert "comfy_api.latest" in result.stderr and "Update ComfyUI" in result.stderr
    assert "Traceback" not in result.stderr


def test_photo_errors_kept_by_comfyui_name_photos_by_number_and_no_root(tmp_path):
    folder = tmp_path / "private_root" / "set_a"
    folder.mkdir(parents=True)
    for name in ("anna_1.jpg", "anna_10.jpg", "notes.txt"):
        (folder / name).write_bytes(b"x")
    message = (f"no usable photo in {folder} (anna_1.jpg: no face found (skipped); anna_10.jpg: too small; "
               "notes.txt: not an image file (skipped))")
    assert convert.numbered_message(message, folder, "set_a") == (
        "no usable photo in set_a (photo 1: no face found (skipped); photo 2: too small; "
        "one file: not an image file (skipped))")
    empty = tmp_path / "private_root" / "empty"
    empty.mkdir()
    assert convert.numbered_message(f"photo folder {empty} holds no images", empty, "empty") \
        == "photo folder empty holds no images"


def test_error_messages_name_comfyui_folders_relatively(tmp_path):
    base = tmp_path / "ComfyUI"
    models, home = base / "models", tmp_path / "home" / "anna"
    root = tmp_path / "anna_photos"
    (base / "input").mkdir(parents=True)
    names = [(str(base), "ComfyUI"), (str(models), "models"), (str(base / "input"), "input"),
             (str(tmp_path / "extra" / "loras"), "<loras folder>"), (str(root), "<private-photos root>"),
             (str(home), "~")]
    message = (f"{models}/loras/iddm_1.safetensors already exists; looked in {models}/facerecognition. "
               f"{tmp_path}/extra/loras/x.safetensors; {root}/set_a/p.jpg; {home}/.cache/comfyui-iddm; "
               f"{base}/custom_nodes/x.py; {base}-old/keep; {root}.")
    assert convert.relative_names(message, names) == (
        "models/loras/iddm_1.safetensors already exists; looked in models/facerecognition. "
        "<loras folder>/x.safetensors; <private-photos root>/set_a/p.jpg; ~/.cache/comfyui-iddm; "
        f"ComfyUI/custom_nodes/x.py; {base}-old/keep; <private-photos root>.")
    link = tmp_path / "link"
    link.symlink_to(base / "input")  # a folder named through a link reads the same
    assert convert.relative_names(f"{base}/input/a.png", [(str(link), "input")]) == "input/a.png"


def test_every_node_names_files_relatively_in_its_errors():
    """ComfyUI keeps every node error in /history: each execute goes through comfy_relative_errors."""
    import re
    sources = {p.name: p.read_text() for p in (pack_nodes.REPO / "nodes").glob("*.py")}
    executes = {name: re.findall(r"((?:\n    @\w+)*)\n    def execute\(", text) for name, text in sources.items()}
    executes = {name: found for name, found in executes.items() if found}
    pack_nodes.load("spec")  # loads the package, whose NODE_MODULES lists every node module
    assert set(executes) == {f"{module}.py" for module in sys.modules[pack_nodes.PACKAGE].NODE_MODULES}
    for name, decorators in executes.items():
        assert all("@comfy_relative_errors" in d for d in decorators), name
