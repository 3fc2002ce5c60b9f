"""Training in half precision computes what float32 computes (diffusers door, tiny model, CPU)."""
from __future__ import annotations

import pytest
import torch

from comfyui_iddm.backends.diffusers_backend import load_denoiser
from comfyui_iddm.faces.ensemble import IdentityEnsemble
from comfyui_iddm.precision import PrecisionError, compute_dtype
from comfyui_iddm.precision_check import compare, step_figures
from conftest import TinyRecognizer, synthetic_photos, tiny_config

PHOTOS = synthetic_photos(4, 64, seed=2)
REFERENCE, PROTECTION = PHOTOS[:2], PHOTOS[2:]
LANDMARKS = torch.tensor([[[22.0, 30.0], [42.0, 30.0], [32.0, 40.0], [24.0, 50.0], [40.0, 50.0]]]).repeat(2, 1, 1)


def figures(mixed_precision: str, prediction_type: str = "epsilon"):
    config = tiny_config(mixed_precision=mixed_precision)
    denoiser = load_denoiser("tiny", config, prediction_type=prediction_type)
    with torch.no_grad():  # a trained-looking LoRA, the same in both runs: gradients reach lora_down too
        for p in denoiser.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    scorer = IdentityEnsemble.from_reference([TinyRecognizer()], REFERENCE, LANDMARKS, config.tau)
    cond = denoiser.encode_prompt([config.instance_prompt])
    return step_figures(denoiser, PROTECTION, LANDMARKS, scorer, cond, seed=1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("half", ["bf16", "fp16"])
def test_half_precision_agrees_with_float32(half, prediction_type):
    agreement = compare(figures("no", prediction_type), figures(half, prediction_type))
    print(f"\n{half}/{prediction_type}: {agreement.as_dict()}")
    assert agreement.finite
    assert agreement.ok, agreement.as_dict()
    # sign() of an exact zero leaves a pixel unmoved: loss scaling keeps fp16 from flushing gradients
    assert agreement.zero_grad_fraction["stage1"] <= agreement.reference_zero_grad_fraction["stage1"] + 0.01


def test_auto_picks_float32_on_cpu_unless_the_weights_are_half():
    assert compute_dtype("auto", "cpu") == torch.float32
    assert compute_dtype("auto", "cpu", torch.float16) == torch.bfloat16
    assert compute_dtype("bf16", "cpu") == torch.bfloat16 and compute_dtype("no", "cpu", torch.float16) == torch.float32
    with pytest.raises(PrecisionError, match="not one of"):
        compute_dtype("fp8", "cpu")
