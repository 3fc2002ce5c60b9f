"""Which dtype the diffusion model computes in, and the autocast that applies it.

The rule, for both doors: LoRA weights and optimizer state are always float32. The model computes in
bf16 where the device has it (its exponent range is float32's, so gradients do not underflow), else
in fp16 with loss scaling (personalize.py scales the fine-tune loss, pgd.py the photo loss), else in
float32. `auto` picks bf16 on a bf16-capable GPU, fp16 on an older GPU, and on a CPU float32 unless
the weights are already stored in half precision (ComfyUI's --fp16-unet / --bf16-unet), then bf16.
bf16 on a CPU is honoured when asked: CPUs with bf16 units run it faster than float32.
"""
from __future__ import annotations

import contextlib

import torch

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
HALF = (torch.float16, torch.bfloat16)


class PrecisionError(ValueError):
    """The requested precision cannot run on this device; the message says what to use."""


def compute_dtype(mixed_precision: str, device: torch.device | str,
                  stored_dtype: torch.dtype = torch.float32) -> torch.dtype:
    device = torch.device(device)
    if mixed_precision == "no":
        return torch.float32
    if mixed_precision == "fp16":
        return torch.float16
    if mixed_precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise PrecisionError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16; set "
                                 "mixed_precision to fp16 (trained with loss scaling) or auto.")
        return torch.bfloat16
    if mixed_precision != "auto":
        raise PrecisionError(f"mixed_precision={mixed_precision!r} is not one of {MIXED_PRECISION}.")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if stored_dtype in HALF else torch.float32


def precision_autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` on any device (CPU included); nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def needs_loss_scaling(dtype: torch.dtype) -> bool:
    """fp16's smallest normal is 6e-5: small gradients flush to zero unless the loss is scaled."""
    return dtype == torch.float16
