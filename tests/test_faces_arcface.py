"""ArcFace from an InsightFace ONNX file: conversion to torch matches onnxruntime, input
normalization follows InsightFace's rule, and the result is a differentiable recognizer."""
import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx2torch")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from comfyui_iddm.faces import registry  # noqa: E402
from comfyui_iddm.faces.nets.arcface_onnx import RAW_PIXELS, build_arcface  # noqa: E402
from comfyui_iddm.faces.nets import SYMMETRIC  # noqa: E402
from comfyui_iddm.faces.weights import WeightFormatError  # noqa: E402


def tiny_arcface_onnx(path, self_normalizing=False, size=112):
    """A small stand-in with ArcFace's interface: [N,3,112,112] -> [N,16] (conv, pool, linear)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.2, (16, 8)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.array([127.5], np.float32), "mean"),
             numpy_helper.from_array(np.array([1 / 127.5], np.float32), "scale")]
    nodes, x = [], "data"
    if self_normalizing:
        nodes += [helper.make_node("Sub", ["data", "mean"], ["centred"], name="Sub_0"),
                  helper.make_node("Mul", ["centred", "scale"], ["normed"], name="Mul_1")]
        x = "normed"
    nodes += [helper.make_node("Conv", [x, "w"], ["c"], name="Conv_2", strides=[4, 4]),
              helper.make_node("Relu", ["c"], ["r"], name="Relu_3"),
              helper.make_node("GlobalAveragePool", ["r"], ["p"], name="Pool_4"),
              helper.make_node("Flatten", ["p"], ["f"], name="Flatten_5"),
              helper.make_node("Gemm", ["f", "fc"], ["fc1"], name="Gemm_6", transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("data", TensorProto.FLOAT,
                                                                            ["N", 3, size, size])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("self_normalizing", [False, True])
def test_converted_arcface_matches_onnxruntime(tmp_path, self_normalizing):
    ort = pytest.importorskip("onnxruntime")
    path = tiny_arcface_onnx(tmp_path / "w600k_r50.onnx", self_normalizing)
    rec = build_arcface(path)
    mean, std = RAW_PIXELS if self_normalizing else SYMMETRIC
    assert rec.mean.flatten().tolist() == pytest.approx(mean) and rec.std.flatten().tolist() == pytest.approx(std)
    torch.manual_seed(0)
    faces = torch.rand(2, 3, 112, 112, requires_grad=True)
    emb = rec(faces)
    # What InsightFace does: RGB pixels 0..255, (x - 127.5) / 127.5 unless the graph does it itself.
    pixels = faces.detach().numpy() * 255
    blob = pixels if self_normalizing else (pixels - 127.5) / 127.5
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"data": blob.astype(np.float32)})[0]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(emb.detach().numpy(), expected, atol=1e-5)
    emb[:, 0].sum().backward()
    assert faces.grad.abs().sum() > 0


def test_arcface_from_a_pack_through_the_registry(tmp_path):
    pack = tmp_path / "insightface" / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    tiny_arcface_onnx(pack / "w600k_r50.onnx")
    assert "arcface" in registry.available_recognizers(tmp_path)
    rec = registry.load_recognizers(["arcface"], tmp_path)[0]
    assert rec.name == "arcface" and rec.input_size == 112


def test_a_detector_model_is_not_accepted_as_arcface(tmp_path):
    path = tiny_arcface_onnx(tmp_path / "glintr100.onnx", size=640)
    with pytest.raises(WeightFormatError, match="112x112"):
        build_arcface(path)
