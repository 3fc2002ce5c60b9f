"""The ComfyUI Denoiser adapter (nodes/comfy_denoiser.py) against the diffusers adapter on the same
random SD1.5 weights: same losses and gradients for a fine-tune step and a PGD step of each stage.

Needs $COMFYUI_PATH (and $COMFYUI_PYTHON with diffusers, i.e. this pack's requirements); see README.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import comfyui_fixtures as cf  # noqa: E402

ROOT = cf.comfyui_path()
pytestmark = cf.comfyui_marks("compare the ComfyUI adapter with the diffusers one")


def test_comfyui_adapter_matches_the_diffusers_adapter():
    checkpoint = cf.ensure_tiny_checkpoint(ROOT)
    result = subprocess.run([cf.comfyui_python(), str(Path(__file__).with_name("equivalence_check.py")),
                             str(checkpoint)], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["lora_modules"] == [32, 32]  # every attention projection, in both namings
    for kind in ("ft", "stage1", "stage2"):
        entry = figures[kind]
        ours, theirs = entry["loss"]
        assert abs(ours - theirs) <= 1e-4 * max(1.0, abs(theirs)), (kind, entry)
        assert entry["latent_max_diff"] < 1e-4, (kind, entry)
        assert entry["grad_max_rel_diff"] < 1e-3, (kind, entry)
    assert figures["ft"]["grads_compared"] == 64  # down and up of each LoRA module
    checkpointed = figures["ft_checkpointed"]  # same gradients with activations recomputed
    assert checkpointed["blocks"] == 5 and checkpointed["grad_max_rel_diff"] < 1e-3, checkpointed
    assert abs(checkpointed["loss"][0] - checkpointed["loss"][1]) <= 1e-4 * max(1.0, abs(checkpointed["loss"][1]))
    assert figures["released"]
