"""benchmarks/bench_cloak.py's pieces: the tiny SD-shaped diffusers model it times both sides on loads
through the engine's own loader, and Anti-DreamBooth's script is moved to the CPU (and to float32 for
the fp32 case) without touching anything else."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_cloak import ensure_tiny_sd, load_anti_dreambooth  # noqa: E402

from comfyui_iddm.backends.diffusers_backend import load_denoiser  # noqa: E402
from comfyui_iddm.cloak import cloak_config  # noqa: E402

FAKE_ASPL = '''
import torch
def where():
    device = torch.device("cuda")
    weight_dtype = torch.bfloat16
    return device, weight_dtype, torch.zeros(1).cuda().device
'''


def test_the_benchmark_model_is_sd_shaped_and_loads_as_a_diffusers_folder(tmp_path):
    folder = ensure_tiny_sd(tmp_path)
    assert ensure_tiny_sd(tmp_path) == folder  # built once
    denoiser = load_denoiser(str(folder), cloak_config(resolution=64))
    base = sum(p.numel() for name, p in denoiser.unet.named_parameters() if ".lora_" not in name)
    assert 0.8e6 < base < 1.5e6 and len(denoiser.codec.vae.config.block_out_channels) == 4
    assert denoiser.encode(torch.rand(1, 3, 64, 64)).shape == (1, 4, 8, 8)
    assert denoiser.encode_prompt(["a photo of sks person"]).shape[0] == 1


def test_anti_dreambooths_script_runs_on_the_cpu_in_the_asked_precision(tmp_path):
    (tmp_path / "attacks").mkdir()
    (tmp_path / "attacks" / "aspl.py").write_text(FAKE_ASPL)
    assert load_anti_dreambooth(tmp_path, "bf16").where() == (torch.device("cpu"), torch.bfloat16,
                                                               torch.device("cpu"))
    assert load_anti_dreambooth(tmp_path, "fp32").where()[1] == torch.float32
