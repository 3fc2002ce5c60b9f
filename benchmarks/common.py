"""Shared pieces of the benchmarks: the photos, the model, a timed IDDM run, peak memory, the machine.

Peak memory on the CPU is the peak resident set size (resource.getrusage ru_maxrss) of a fresh
child process per measurement, minus its resident size right after set-up (model, recognizers and
photos loaded): what the training itself adds. tracemalloc is not used because it does not see
torch's tensor allocations. On CUDA it is torch.cuda.max_memory_allocated (tensors only).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from comfyui_iddm.config import IDDMConfig  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"Python {platform.python_version()}, load average {load:.1f} at start")


def rss_mb() -> float:
    """Current resident set size (Linux /proc; falls back to the peak elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def load_photos(count: int, resolution: int, photos_dir: Path | None = None, reference: int | None = None):
    """(Xc, X0): the demo's sample private set (one real face, augmented) or a folder of photos."""
    from comfyui_iddm.faces.detect import MTCNNDetector
    from comfyui_iddm.photos import load_photo_folder, split_photos

    detector = MTCNNDetector()
    if photos_dir is None:
        from comfyui_iddm.demo import sample_private_set
        photos = sample_private_set(resolution, detector, count)
    else:
        photos = load_photo_folder(photos_dir, resolution, detector)
    return split_photos(photos, reference or len(photos) // 2, "order")


@dataclass
class Timed:
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    phase_seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    peak_mb: float = 0.0  # see the module docstring
    result: Any = None


def timed_iddm(denoiser, reference, protection, config: IDDMConfig, *, weights_dir=None,
               evaluators=None) -> Timed:
    """train_on_photos with the time of every step, by phase (from the progress events)."""
    from comfyui_iddm.pipeline import train_on_photos

    timed = Timed()
    last = [time.perf_counter()]

    def on_progress(event) -> None:
        now = time.perf_counter()
        phase = "finetune" if event.phase.startswith("finetune") else event.phase
        timed.phase_seconds[phase].append(now - last[0])
        last[0] = now

    cuda = denoiser.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start, cpu = time.perf_counter(), time.process_time()
    last[0] = start
    timed.result = train_on_photos(denoiser, reference, protection, config, weights_dir=weights_dir,
                                   evaluators=evaluators, on_progress=on_progress)
    timed.seconds, timed.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    if cuda:
        timed.peak_mb = torch.cuda.max_memory_allocated() / 2**20
    return timed


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def run_child(script: Path, args: list[str]) -> dict[str, Any]:
    """Runs `script --child ARGS` in a fresh interpreter; it prints one JSON line last."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(script), "--child", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
