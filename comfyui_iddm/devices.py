"""Which compute device a command may run on: checked before anything is loaded, with a message
that says what was asked, what this machine has and what to do (not torch's traceback)."""
from __future__ import annotations

import re

DEVICE_FORMS = "cpu, cuda, cuda:N (N = GPU number) or mps"


class DeviceError(ValueError):
    pass


def available_devices() -> list[str]:
    """Devices this torch can use here, e.g. ['cpu', 'cuda:0 (NVIDIA A100)', 'mps']."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def check_device(device: str) -> str:
    """`device` as torch spells it, or DeviceError saying what exists and what to do."""
    import torch

    name = device.strip().lower()
    here = f"This machine has: {', '.join(available_devices())}."
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", name)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DeviceError(f"--device {device!r} is not a device; use {DEVICE_FORMS}. {here}")
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise DeviceError(
                f"--device {device}: this torch ({torch.__version__}) was built without CUDA, so it "
                f"cannot use an NVIDIA GPU. {here} Use --device cpu, or install a CUDA build of torch "
                "(the command for your system is on pytorch.org) on a machine with an NVIDIA GPU.")
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {device}: torch finds no usable NVIDIA GPU here (no GPU, or no NVIDIA driver "
                f"loaded; `nvidia-smi` should list the GPU). {here} Use --device cpu (the demo and the "
                "tiny model need no GPU; a real Stable Diffusion model trains for hours on a CPU), or "
                "run on a machine with an NVIDIA GPU and its driver.")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise DeviceError(f"--device {device}: there is no GPU number {index}; GPUs are numbered "
                              f"from 0 and this machine has {count}. {here}")
    if kind == "mps" and not _mps_available():
        raise DeviceError(
            f"--device {device}: Apple's Metal GPU (mps) is not available here; it needs a Mac with "
            f"Apple silicon (or an AMD GPU), macOS 12.3 or newer and a torch built with MPS. {here} "
            "Use --device cpu.")
    return name


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
