"""Shared pieces of the benchmarks: the photos, the model, a timed IDDM run, peak memory, the machine.

Peak memory on the CPU is the peak resident set size (resource.getrusage ru_maxrss) of a fresh
child process per measurement, minus its resident size right after set-up (model, recognizers and
photos loaded): what the training itself adds. TrainingPeak does the same exactly from a point of
its choosing, with the kernel's high-water mark reset there (/proc/self/clear_refs). tracemalloc is
not used because it does not see torch's tensor allocations. On CUDA it is
torch.cuda.max_memory_allocated (tensors only).
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
GIB = 2 ** 30
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
        return status_mb("VmRSS")
    except (OSError, RuntimeError):
        return peak_rss_mb()


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM = peak RSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}; this benchmark measures memory on Linux only")


def reset_peak_rss() -> None:
    """Sets the kernel's high-water mark (VmHWM) to the current RSS, so that it records the peak of
    what follows exactly (a sampling thread misses the short peaks of single large ops)."""
    Path("/proc/self/clear_refs").write_text("5")


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


class TrainingPeak:
    """Peak memory from construction to the run's last training step, over the use at construction,
    overall and per phase (the peak is reset after every step). Pass `on_progress` to the run; the
    evaluation after training is not counted. CPU: resident set (a phase's figure includes what
    earlier phases left in malloc's heap); CUDA: allocated tensors."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
        self.start = torch.cuda.memory_allocated() if self.cuda else status_mb("VmRSS") * 2 ** 20
        self.phase_peaks: dict[str, float] = {}
        self._reset()

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()

    def on_progress(self, event) -> None:
        peak = torch.cuda.max_memory_allocated() if self.cuda else status_mb("VmHWM") * 2 ** 20
        self.phase_peaks[event.phase] = max(self.phase_peaks.get(event.phase, 0.0), peak)
        if event.done < event.total:
            self._reset()

    @property
    def peak(self) -> float:
        return max(self.phase_peaks.values())

    @property
    def added_gib(self) -> float:
        return (self.peak - self.start) / GIB

    def phase_added_gib(self) -> dict[str, float]:
        return {phase: round((peak - self.start) / GIB, 3) for phase, peak in self.phase_peaks.items()}


@dataclass
class Timed:
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    phase_seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    phase_cpu_seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # all threads
    peak_mb: float = 0.0  # see the module docstring
    result: Any = None


def timed_iddm(denoiser, reference, protection, config: IDDMConfig, *, weights_dir=None,
               evaluators=None, on_progress=None) -> Timed:
    """train_on_photos with the time of every step, by phase (from the progress events); the
    events are passed on to `on_progress` after they are timed."""
    from comfyui_iddm.pipeline import train_on_photos

    timed = Timed()
    last = [time.perf_counter(), time.process_time()]

    def record(event) -> None:
        now = [time.perf_counter(), time.process_time()]
        phase = "finetune" if event.phase.startswith("finetune") else event.phase
        timed.phase_seconds[phase].append(now[0] - last[0])
        timed.phase_cpu_seconds[phase].append(now[1] - last[1])
        last[:] = now
        if on_progress is not None:
            on_progress(event)

    cuda = denoiser.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start, cpu = time.perf_counter(), time.process_time()
    last[:] = [start, cpu]
    timed.result = train_on_photos(denoiser, reference, protection, config, weights_dir=weights_dir,
                                   evaluators=evaluators, on_progress=record)
    timed.seconds, timed.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    if cuda:
        timed.peak_mb = torch.cuda.max_memory_allocated() / 2**20
    return timed


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


class ChildFailed(RuntimeError):
    def __init__(self, returncode: int, stderr: str) -> None:
        super().__init__(f"benchmark child failed (exit code {returncode}):\n{stderr[-3000:]}")
        self.returncode, self.stderr = returncode, stderr


def run_child(script: Path, args: list[str], *, python: str = sys.executable, cwd: Path | None = None,
              extra_path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Runs `script --child ARGS` in a fresh interpreter (`python`, with the repository and
    `extra_path` importable); it prints one JSON line last."""
    path = os.pathsep.join([str(REPO_ROOT), *extra_path, os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([python, str(script), "--child", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, cwd=cwd)
    if done.returncode != 0:
        raise ChildFailed(done.returncode, done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])
