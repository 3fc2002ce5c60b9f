"""Load: IDDM on 50 photos at 512 px on the tiny model, peak memory of every iteration (issue 5:
the peak at iteration K must be within 10% of iteration 2's: no growth across iterations).

    python benchmarks/bench_load.py [--photos 50] [--resolution 512] [--iterations 5]
                                    [--photos-dir DIR] [--recognizers dlib_resnet] [--json FILE]

The photos are written to a temporary folder and read back through the CLI's path (streamed
reading, MTCNN face crops): by default variations of one face of the demo's sample photo (the
insightface package's t1.jpg), or the given folder's photos. Memory is the resident set size:
the kernel's high-water mark, reset at the start of every iteration (torch's tensors are invisible
to tracemalloc, and a sampling thread misses the peaks of single large ops). Figures are printed, never asserted
(tests/test_iddm_loop.py has the small-scale growth test).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, reset_peak_rss, status_mb  # noqa: E402

from comfyui_iddm.config import IDDMConfig  # noqa: E402


@dataclass
class IterationMemory:
    iteration: int
    peak_mb: float  # highest resident set size during the iteration
    end_mb: float  # resident set size after its last step
    seconds: float


class IterationPeaks:
    """Peak resident memory of every IDDM iteration, from the kernel's high-water mark (VmHWM in
    /proc/self/status, reset at each iteration's start through /proc/self/clear_refs): exact, unlike
    a sampling thread, which misses the short peaks of single large ops. Linux only. Pass
    `on_progress` to the run; use as a context manager."""

    def __init__(self) -> None:
        self.results: list[IterationMemory] = []
        self._iteration, self._started = None, time.perf_counter()

    def __enter__(self) -> "IterationPeaks":
        self.baseline_mb = status_mb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self._close()
        self.after_mb = round(status_mb("VmHWM"), 1)  # since the last step: evaluation and writing

    def _close(self) -> None:
        if self._iteration is not None:
            self.results.append(IterationMemory(self._iteration, round(status_mb("VmHWM"), 1),
                                                round(status_mb("VmRSS"), 1),
                                                round(time.perf_counter() - self._started, 2)))
            self._iteration = None

    def on_progress(self, event) -> None:
        if event.iteration != self._iteration:
            self._close()  # the previous iteration ended with its last step
            reset_peak_rss()
            self._iteration, self._started = event.iteration, time.perf_counter()
        if event.done == event.total:  # the run's last step: what follows is evaluation, not training
            self._close()
            reset_peak_rss()

    def growth(self, first: int = 2) -> float:
        """Peak of the last iteration relative to iteration `first` (0.05 = 5% more)."""
        peaks = {r.iteration: r.peak_mb for r in self.results}
        return peaks[max(peaks)] / peaks[first] - 1


def write_sample_photos(folder: Path, count: int, side: int) -> None:
    """`count` variations of the demo's sample face, side x side px, as JPEG files."""
    from PIL import Image

    from comfyui_iddm.demo import augmented_photos, frontal_face, sample_photo_path
    from comfyui_iddm.faces.detect import MTCNNDetector
    from comfyui_iddm.photos import pil_to_tensor, read_image

    image = read_image(sample_photo_path())
    face = frontal_face(MTCNNDetector().detect(pil_to_tensor(image)[None])[0])
    for i, photo in enumerate(augmented_photos(image, face.box, count, seed=0)):
        photo.resize((side, side), Image.Resampling.LANCZOS).save(folder / f"{i:03d}.jpg", quality=92)


def run(photos_dir: Path, config: IDDMConfig, evaluators: list[str]) -> IterationPeaks:
    from comfyui_iddm.pipeline import FolderOutputs, train_folder

    with tempfile.TemporaryDirectory() as out, IterationPeaks() as peaks:
        train_folder(photos_dir, "tiny", FolderOutputs(Path(out) / "load.safetensors"), config,
                     detector="mtcnn", evaluators=evaluators, on_progress=peaks.on_progress)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--pgd-steps", type=int, default=4)
    parser.add_argument("--ft-steps", type=int, default=2)
    parser.add_argument("--photos-dir", type=Path, default=None, help="use these photos instead of the sample face")
    parser.add_argument("--recognizers", default="dlib_resnet", help="Stage II surrogates (dlib_resnet ships on PyPI)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = IDDMConfig(iterations=args.iterations, resolution=args.resolution, pgd_steps=args.pgd_steps,
                        ft_steps=args.ft_steps, rho=0.5, recognizers=args.recognizers)
    print(f"machine: {machine()}, torch threads {args.threads}")
    with tempfile.TemporaryDirectory() as folder:
        photos_dir = args.photos_dir
        if photos_dir is None:
            photos_dir = Path(folder)
            write_sample_photos(photos_dir, args.photos, args.resolution + args.resolution // 4)
        started = time.perf_counter()
        peaks = run(photos_dir, config, list(config.recognizers))
    print(f"{args.photos} photos at {args.resolution} px, K={args.iterations}, T={args.pgd_steps}, "
          f"FT steps {args.ft_steps}, surrogates {args.recognizers}; baseline RSS {peaks.baseline_mb:.0f} MB")
    print("iteration  peak RSS MB  RSS at end MB  seconds")
    for r in peaks.results:
        print(f"{r.iteration:9d}  {r.peak_mb:11.1f}  {r.end_mb:13.1f}  {r.seconds:7.1f}")
    print(f"after training (identity before/after, report, writing): peak RSS {peaks.after_mb:.1f} MB")
    growth = peaks.growth()
    print(f"peak at iteration {peaks.results[-1].iteration} vs iteration 2: {growth * 100:+.1f}% "
          f"({'within' if abs(growth) <= 0.10 else 'OUTSIDE'} the 10% target); total "
          f"{time.perf_counter() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "config": config.to_dict(), "photos": args.photos,
                                         "baseline_mb": peaks.baseline_mb, "after_training_peak_mb": peaks.after_mb,
                                         "growth_vs_iteration_2": growth,
                                         "iterations": [asdict(r) for r in peaks.results]}, indent=2))


if __name__ == "__main__":
    main()
