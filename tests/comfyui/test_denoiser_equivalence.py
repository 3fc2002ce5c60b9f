"""The ComfyUI Denoiser adapter (nodes/comfy_denoiser.py) against the diffusers adapter on the same
random SD1.5 weights: same losses and gradients for a fine-tune step and a PGD step of each stage;
gradient checkpointing (UNet and VAE blocks) changes no gradient; a LoRA of another model is a
LoRAError; `release` puts ComfyUI's shared modules back.

Needs $COMFYUI_PATH (and $COMFYUI_PYTHON with diffusers, i.e. this pack's requirements); see README.md.
"""
from __future__ import annotations

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import comfyui_fixtures as cf  # noqa: E402

ROOT = cf.comfyui_path()
pytestmark = cf.comfyui_marks("compare the ComfyUI adapter with the diffusers one")


def test_comfyui_adapter_matches_the_diffusers_adapter():
    figures = cf.run_comfy_script(Path(__file__).with_name("equivalence_check.py"), cf.ensure_tiny_checkpoint(ROOT))
    assert figures["lora_modules"] == [32, 32]  # every attention projection, in both namings
    for kind in ("ft", "stage1", "stage2"):
        entry = figures[kind]
        ours, theirs = entry["loss"]
        assert abs(ours - theirs) <= 1e-4 * max(1.0, abs(theirs)), (kind, entry)
        assert entry["latent_max_diff"] < 1e-4, (kind, entry)
        assert entry["grad_max_rel_diff"] < 1e-3, (kind, entry)
    assert figures["ft"]["grads_compared"] == 64  # down and up of each LoRA module

    # Same gradients with activations recomputed: 5 UNet blocks + the VAE's resnet/attention/resampling blocks.
    assert figures["checkpointed_blocks"] > 5, figures["checkpointed_blocks"]
    for kind in ("ft", "stage1", "stage2"):
        checkpointed = figures[f"{kind}_checkpointed"]
        assert checkpointed["grad_max_rel_diff"] < 1e-3, (kind, checkpointed)
        assert abs(checkpointed["loss"][0] - checkpointed["loss"][1]) <= 1e-5 * max(1.0, abs(checkpointed["loss"][1]))
    # ...and they really are recomputed in backward: the UNet in every step, the VAE encoder where the
    # photo gradient passes through it (the PGD stages), the decoder in Stage II.
    calls = {kind: figures[f"{kind}_calls"] for kind in ("ft", "stage1", "stage2")}
    assert calls["ft"] == {"plain": {"unet": 1, "vae_encoder": 1, "vae_decoder": 0},
                           "checkpointed": {"unet": 2, "vae_encoder": 1, "vae_decoder": 0}}, calls
    assert calls["stage1"] == {"plain": {"unet": 1, "vae_encoder": 1, "vae_decoder": 0},
                               "checkpointed": {"unet": 2, "vae_encoder": 2, "vae_decoder": 0}}, calls
    assert calls["stage2"] == {"plain": {"unet": 1, "vae_encoder": 1, "vae_decoder": 1},
                               "checkpointed": {"unet": 2, "vae_encoder": 2, "vae_decoder": 2}}, calls

    # A LoRA of another model (the other door's module names; another rank) is a LoRAError that says why.
    refusals = figures["lora_refusals"]
    assert refusals["other_naming"]["is_lora_error"], refusals
    assert "does not fit this model" in refusals["other_naming"]["message"]
    assert refusals["other_rank"]["is_lora_error"] and "set rank" in refusals["other_rank"]["message"], refusals

    released = figures["released"]
    assert released["after"] == released["before"], released
