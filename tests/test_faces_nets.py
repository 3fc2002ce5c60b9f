"""Recognizer architectures, published state-dict layouts, weight search and safe loading."""
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfyui_iddm.faces import registry
from comfyui_iddm.faces.nets.irse import IRBackbone, build_ir152, build_irse50
from comfyui_iddm.faces.nets.mobilefacenet import (MobileFaceNetFoamliu, MobileFaceNetInsightFacePytorch,
                                                   build_mobilefacenet)
from comfyui_iddm.faces.weights import MissingWeightError, WeightFormatError, read_state_dict


def _randomized(net: torch.nn.Module) -> dict:
    """A state dict with random (non-default) values, so a wrong mapping would change outputs."""
    torch.manual_seed(0)
    state = {}
    for key, value in net.state_dict().items():
        if value.is_floating_point():
            value = torch.rand_like(value) + 0.5 if "running_var" in key else torch.randn_like(value) * 0.1
        state[key] = value
    return state


def _check_recognizer(rec, name, size, dim, backward=False):
    """Unit embeddings of the right size; with backward=True also gradients to the pixels (the big
    networks skip that to keep the suite fast: they are plain conv nets like MobileFaceNet)."""
    assert rec.name == name and rec.input_size == size and rec.template.shape == (5, 2)
    assert not any(p.requires_grad for p in rec.parameters())  # frozen
    x = torch.rand(1, 3, size, size, requires_grad=backward)
    emb = rec(x)
    assert emb.shape == (1, dim)
    assert torch.allclose(emb.norm(dim=1), torch.ones(1), atol=1e-5)
    if backward:
        emb[:, 0].sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_mobilefacenet_foamliu_layout_loads_and_embeds():
    state = _randomized(MobileFaceNetFoamliu())
    rec = build_mobilefacenet(state)
    _check_recognizer(rec, "mobilefacenet", 112, 128, backward=True)
    # Exactly the given weights are used: same state -> same embedding; train() cannot unfreeze BN.
    x = torch.rand(1, 3, 112, 112)
    rec.train()
    assert not rec.training and torch.allclose(rec(x), build_mobilefacenet(state)(x))


def test_mobilefacenet_insightface_pytorch_layout_loads_and_embeds():
    state = _randomized(MobileFaceNetInsightFacePytorch(512))
    _check_recognizer(build_mobilefacenet(state), "mobilefacenet", 112, 512, backward=True)


@pytest.mark.parametrize("build,name,depth,se", [(build_irse50, "irse50", 50, True),
                                                 (build_ir152, "ir152", 152, False)])
def test_ir_backbones_load_published_layouts(build, name, depth, se):
    state = _randomized(IRBackbone(depth, se))
    assert "body.0.res_layer.1.weight" in state and "output_layer.3.weight" in state
    if se:
        assert "body.0.res_layer.5.fc1.weight" in state
    _check_recognizer(build(state), name, 112, 512)


def test_ir152_release_without_affine_embedding_norm_loads():
    state = _randomized(IRBackbone(152, False, affine_embedding_bn=False))
    assert "output_layer.4.weight" not in state
    _check_recognizer(build_ir152(state), "ir152", 112, 512)


def test_facenet_wraps_facenet_pytorch_and_drops_the_classifier():
    pytest.importorskip("facenet_pytorch")
    from facenet_pytorch import InceptionResnetV1
    net = InceptionResnetV1(classify=True, num_classes=8631)
    state = _randomized(net)
    assert "logits.weight" in state
    _check_recognizer(registry.build_from_state_dict("facenet", state), "facenet", 160, 512)


def test_wrong_architecture_names_recognizer_and_file(tmp_path):
    path = tmp_path / "irse50.safetensors"
    save_file(_randomized(MobileFaceNetFoamliu()), str(path))
    with pytest.raises(WeightFormatError, match=r"irse50\.safetensors.*irse50"):
        registry.load_recognizers(["irse50"], tmp_path)
    with pytest.raises(WeightFormatError, match="not a MobileFaceNet"):
        build_mobilefacenet({"foo.weight": torch.zeros(1)}, Path("mobilefacenet.pth"))


@pytest.mark.parametrize("wrap", ["plain", "module_prefix", "state_dict_key", "no_batch_counters"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weight_files_in_common_layouts_load(tmp_path, wrap, suffix):
    state = _randomized(MobileFaceNetFoamliu())
    stored = dict(state)
    if wrap == "module_prefix":
        stored = {f"module.{k}": v for k, v in stored.items()}
    if wrap == "no_batch_counters":  # checkpoints from before PyTorch 0.4.1
        stored = {k: v for k, v in stored.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / f"mobilefacenet_test{suffix}"
    if suffix == ".safetensors":
        save_file(stored, str(path))
    else:
        torch.save({"state_dict": stored, "epoch": 3} if wrap == "state_dict_key" else stored, path)
    rec = registry.load_recognizers(["mobilefacenet"], tmp_path)[0]
    x = torch.rand(1, 3, 112, 112)
    assert torch.allclose(rec(x), build_mobilefacenet(state)(x), atol=1e-6)


class _Evil:
    def __reduce__(self):
        return (print, ("this ran from a weight file",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "mobilefacenet.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(WeightFormatError, match="pickled Python objects"):
        read_state_dict(path)


def test_missing_weight_error_says_what_where_and_licence(tmp_path):
    with pytest.raises(MissingWeightError) as err:
        registry.load_recognizers(["ir152"], tmp_path)
    text = str(err.value)
    assert "ir152*.pth" in text and str(tmp_path) in text and "models/facerecognition" in text
    assert "face-privacy" in text and "non-commercial" in text


def test_auto_finds_present_weights_and_env_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_locate_dlib", lambda weights_dir: None)
    monkeypatch.setitem(registry.RECOGNIZERS, "dlib_resnet",
                        registry.RECOGNIZERS["dlib_resnet"].__class__(
                            **{**registry.RECOGNIZERS["dlib_resnet"].__dict__, "locate": lambda d: None}))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.insightface packs
    assert registry.available_recognizers(tmp_path) == []
    with pytest.raises(MissingWeightError, match="auto found no"):
        registry.resolve_names(["auto"], tmp_path)
    save_file(_randomized(MobileFaceNetFoamliu()), str(tmp_path / "mobilefacenet.safetensors"))
    assert registry.available_recognizers(tmp_path) == ["mobilefacenet"]
    monkeypatch.setenv("IDDM_WEIGHTS_DIR", str(tmp_path))
    assert registry.resolve_names(["auto", "mobilefacenet"]) == ["mobilefacenet"]
    assert [r.name for r in registry.load_recognizers(["auto"])] == ["mobilefacenet"]


def test_unknown_recognizer_lists_the_choices():
    with pytest.raises(ValueError, match="irse50, ir152, mobilefacenet, facenet, arcface, dlib_resnet"):
        registry.resolve_names(["vggface"])


def test_registry_specs_are_complete():
    assert {"irse50", "ir152", "mobilefacenet", "facenet", "arcface", "dlib_resnet"} <= set(registry.RECOGNIZERS)
    for spec in registry.RECOGNIZERS.values():
        assert spec.input_size in (112, 150, 160) and spec.embedding_dim > 0
        assert spec.source and spec.licence and spec.patterns


def test_arcface_is_found_in_an_insightface_pack_beside_the_weights_folder(tmp_path):
    pack = tmp_path / "insightface" / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    (pack / "w600k_r50.onnx").write_bytes(b"")
    weights = tmp_path / "facerecognition"
    weights.mkdir()
    assert registry.RECOGNIZERS["arcface"].locate(weights) == pack / "w600k_r50.onnx"


def test_missing_packages_name_the_install_command(monkeypatch):
    import sys

    from comfyui_iddm.faces.detect import MTCNNDetector
    from comfyui_iddm.faces.nets.facenet import build_facenet
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # import fails as if not installed
    for build in (build_facenet, MTCNNDetector):
        with pytest.raises(ImportError, match="pip install --no-deps facenet-pytorch"):
            build()


def test_missing_sample_photos_say_how_to_get_them(monkeypatch):
    import importlib.util

    from comfyui_iddm import samples
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps insightface"):
        samples.group_photo()
