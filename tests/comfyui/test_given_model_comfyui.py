"""IDDM Train uses the MODEL it is given, on a real server started with half-precision storage flags
(--fp16-unet --bf16-vae: the UNet stored in fp16 and the VAE in bf16, as ComfyUI does on NVIDIA cards).

- A full train-and-generate run works in half precision (mixed_precision 'auto' computes in bf16).
- What the MODEL is, is read from its own patches, whatever graph ran before on the same server:
  a MODEL patched by ModelSamplingSD3 (flow) or ModelSamplingDiscrete x0 is refused every time, naming
  its sampling; eps and v_prediction ones are trained as such. Each accepted graph also samples with
  its MODEL, which leaves ComfyUI's shared model patched for the next graph (what used to decide).
- The MODEL's attention patches (set_model_attn1_patch) run during IDDM Train's forward passes, with
  the transformer_options ComfyUI's samplers fill in.
"""
from __future__ import annotations

import json
import re
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import comfyui_fixtures as cf  # noqa: E402
import workflow_graphs as wg  # noqa: E402

pytestmark = cf.comfyui_marks("run IDDM Train on the MODEL it is given on a real ComfyUI")
RUN = uuid.uuid4().hex[:6]
PHOTOS = f"iddm_gm_{RUN}"
FLAGS = ("--fp16-unet", "--bf16-vae")
PROBE_PACK = Path(__file__).with_name("probe_pack")
SAMPLING = {  # name -> the node that patches the MODEL's sampling
    "eps": {"class_type": "ModelSamplingDiscrete", "inputs": {"sampling": "eps", "zsnr": False}},
    "v": {"class_type": "ModelSamplingDiscrete", "inputs": {"sampling": "v_prediction", "zsnr": False}},
    "x0": {"class_type": "ModelSamplingDiscrete", "inputs": {"sampling": "x0", "zsnr": False}},
    "flow": {"class_type": "ModelSamplingSD3", "inputs": {"shift": 3.0}},
}
ACCEPTED = {"eps": "epsilon", "v": "v_prediction"}
REFUSED = {"x0": "samples as x0 prediction", "flow": "samples as flow (CONST) prediction"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with cf.pack_server(tmp_path_factory.mktemp("comfy"), PHOTOS, f"iddm_test_{RUN}", flags=FLAGS,
                        packs={"iddm-test-probe": PROBE_PACK}) as server:
        yield server


def train_and_generate(name: str) -> dict:
    return cf.tiny_run(json.loads((wg.WORKFLOWS / "api" / "iddm_train_and_generate.json").read_text()),
                       PHOTOS, f"_{RUN}_{name}")


def with_model_node(graph: dict, node: dict) -> dict:
    """The graph with `node` between Load Checkpoint's MODEL and everything that used it."""
    checkpoint = next(i for i, n in graph.items() if n["class_type"] == "CheckpointLoaderSimple")
    for other in graph.values():
        for key, value in other["inputs"].items():
            if value == [checkpoint, 0]:
                other["inputs"][key] = ["90", 0]
    graph["90"] = {"class_type": node["class_type"], "inputs": {"model": [checkpoint, 0], **node["inputs"]}}
    return graph


def training_lines(server: cf.ComfyServer, since: int) -> list[str]:
    return re.findall(r"\[IDDM\] training .*", server.log()[since:])


def test_a_full_run_works_with_half_precision_storage(server):
    log_before = len(server.log())
    entry = cf.run_graph(server, train_and_generate("half"))
    [line] = training_lines(server, log_before)
    assert line.endswith("epsilon model computing in bfloat16, its VAE in bfloat16"), line
    saved = [n for o in entry["outputs"].values() for n in o.get("images", [])]
    assert saved and cf.loras(f"iddm_test_{RUN}_half")


def test_the_model_check_reads_the_given_model_in_any_order(server):
    """Graphs queued one after another; each accepted one also samples with its MODEL afterwards."""
    order = ["eps", "flow", "x0", "v", "flow", "eps", "x0"]
    outcomes = []
    for position, name in enumerate(order):
        graph = with_model_node(train_and_generate(f"{position}{name}"), SAMPLING[name])
        # Sampling and decoding only: the similarity and public-image nodes are not needed here.
        graph = {i: n for i, n in graph.items()
                 if n["class_type"] not in ("IDDMIdentitySimilarity", "PreviewImage", "IDDMSavePublicImage")}
        decode = next(i for i, n in graph.items() if n["class_type"] == "VAEDecode")
        graph["91"] = {"class_type": "PreviewImage", "inputs": {"images": [decode, 0]}}
        log_before = len(server.log())
        entry = server.wait(server.queue(graph))
        status, lines = entry["status"]["status_str"], training_lines(server, log_before)
        errors = " ".join(e.get("exception_message", "") for e in cf.execution_errors(entry))
        outcomes.append((name, status, lines, errors[:300]))
        made = cf.loras(f"iddm_test_{RUN}_{position}{name}")
        if name in ACCEPTED:
            assert status == "success", outcomes
            assert len(lines) == 1 and f"{ACCEPTED[name]} model computing in bfloat16" in lines[0], outcomes
            assert made, outcomes
        else:
            assert status == "error" and REFUSED[name] in errors and not lines and not made, outcomes
            assert all(other not in errors for key, other in REFUSED.items() if key != name), outcomes
    print("\nmodel-check order:", [(name, status, errors[:80] or lines) for name, status, lines, errors in outcomes])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_models_attention_patch_runs_during_training(server, checkpointing):
    """With gradient checkpointing the patch runs again when backward recomputes a layer, seeing the
    same transformer_options as in the forward pass (else the recomputation would fail)."""
    graph = with_model_node(train_and_generate(f"probe{int(checkpointing)}"),
                            {"class_type": "IDDMTestAttentionProbe", "inputs": {}})
    # IDDM Train alone consumes the probed MODEL: every probe line comes from its forward passes.
    graph = {i: n for i, n in graph.items() if n["class_type"] in (
        "CheckpointLoaderSimple", "IDDMTestAttentionProbe", "IDDMLoadPrivatePhotos", "IDDMSplitReferenceProtection",
        "IDDMTrain", "IDDMTrainOptions")}
    next(n for n in graph.values() if n["class_type"] == "IDDMTrain")["inputs"]["gradient_checkpointing"] = checkpointing
    log_before = len(server.log())
    cf.run_graph(server, graph)
    calls = re.findall(r"\[iddm-probe\] attn1 (.*)", server.log()[log_before:])
    assert calls, "the MODEL's attn1 patch never ran during IDDM Train"
    assert all("sigmas=[" in c and "cond_or_uncond=[0]" in c and "sample_sigmas=True" in c for c in calls), calls[:5]
    assert any("grad=True" in c for c in calls), calls[:5]  # fine-tune and PGD passes record gradients
    # 2 + 2 fine-tune steps and 2 PGD steps, 4 transformer blocks each; checkpointing recomputes them
    assert len(calls) == (48 if checkpointing else 24), len(calls)
