"""Identity Similarity over many generated images: peak memory must not grow with their number.

Each count runs in a fresh child process: MTCNN + dlib's ResNet measure N "generated" images (the
demo's sample face, augmented, at 256 px) against 4 reference photos. Printed: resident memory after
set-up (images included), and what measuring adds on top (kernel high-water mark, Linux). Figures only, no asserts.

    python benchmarks/bench_similarity.py [--counts 100,500] [--resolution 256]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import load_photos, machine, rss_mb, run_child


def high_water_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("needs Linux (/proc/self/status)")


def child(count: int, resolution: int) -> dict:
    import torch

    from comfyui_iddm.faces.detect import MTCNNDetector
    from comfyui_iddm.faces.registry import load_recognizers
    from comfyui_iddm.metrics import similarity_to_reference

    torch.set_num_threads(1)
    reference, protection = load_photos(8, resolution)
    generated = protection.images.repeat((count + len(protection) - 1) // len(protection), 1, 1, 1)[:count]
    generated = (generated + 0.02 * torch.randn_like(generated)).clamp(0, 1)  # distinct images
    detector, recognizer = MTCNNDetector(), load_recognizers(["dlib_resnet"])[0]
    set_up = rss_mb()
    # Reset the kernel's high-water mark (Linux): the peak below is the measuring alone, not the
    # transient copies made while building the test images.
    Path("/proc/self/clear_refs").write_text("5")
    started = time.perf_counter()
    result = similarity_to_reference(recognizer, detector, generated, reference.images)
    return {"count": count, "seconds": time.perf_counter() - started, "images_mb": generated.numel() * 4 / 2**20,
            "set_up_mb": set_up, "peak_mb": high_water_mb(), "fsr": result["fsr"],
            "mean_similarity": result["mean_similarity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="100,500")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.count, args.resolution)))
        return
    print(machine())
    print(f"{'images':>7} {'images MB':>10} {'set-up MB':>10} {'peak MB':>8} {'added MB':>9} {'s':>6} {'FSR':>5} {'mean cos':>9}")
    for count in (int(c) for c in args.counts.split(",")):
        r = run_child(Path(__file__), ["--count", str(count), "--resolution", str(args.resolution)])
        added = r["peak_mb"] - r["set_up_mb"]
        print(f"{count:>7} {r['images_mb']:>10.0f} {r['set_up_mb']:>10.0f} {r['peak_mb']:>8.0f} {added:>9.0f} "
              f"{r['seconds']:>6.1f} {r['fsr']:>5.2f} {r['mean_similarity']:>9.3f}")


if __name__ == "__main__":
    main()
