"""The CPU allocator policy (comfyui_iddm/allocator.py) and bf16 on the CPU, measured side by side.

    python benchmarks/bench_allocator.py [--resolution 256] [--threads 2] [--json]

One outer IDDM iteration on the tiny model (3 fine-tune steps of batch 2, 6 PGD steps on 4 photos
(3 Stage I + 3 Stage II), 3 fine-tune steps) in a fresh child process per case: glibc's default
malloc against the policy (no mmap, no trim), each in float32 and bf16 compute. Printed per case:
wall and system seconds, minor page faults, the mean PGD step, peak RSS, and the RSS the process
still holds after the run (the policy's price in a long-lived process). Figures only, no asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IDDMConfig, load_photos, machine, mean, peak_rss_mb, rss_mb, run_child, timed_iddm  # noqa: E402

SCHEDULE = dict(iterations=1, ft_steps=3, pgd_steps=6, rho=0.5, batch_size=2, stage2_timesteps=(0, 20),
                recognizers=("dlib_resnet",), seed=0)


def child(args: argparse.Namespace) -> None:
    from comfyui_iddm.allocator import keep_freed_memory
    from comfyui_iddm.backends.diffusers_backend import load_denoiser

    applied = keep_freed_memory()
    torch.set_num_threads(args.threads)
    config = IDDMConfig(resolution=args.resolution, mixed_precision=args.precision, **SCHEDULE)
    reference, protection = load_photos(8, args.resolution)
    denoiser = load_denoiser("tiny", config)
    start_usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    timed = timed_iddm(denoiser, reference, protection, config)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    del timed.result
    print(json.dumps({
        "policy": "keep" if applied else "default", "precision": args.precision,
        "seconds": round(time.perf_counter() - started, 2),
        "system_seconds": round(usage.ru_stime - start_usage.ru_stime, 2),
        "minor_faults": usage.ru_minflt - start_usage.ru_minflt,
        "pgd_step_seconds": round(mean(timed.phase_seconds["stage1"] + timed.phase_seconds["stage2"]), 3),
        "ft_step_seconds": round(mean(timed.phase_seconds["finetune"]), 3),
        "peak_rss_mb": round(peak_rss_mb()), "rss_after_run_mb": round(rss_mb())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--precision", default="no", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    cases = []
    for precision in ("no", "bf16"):
        for policy in ("default", "keep"):
            os.environ["IDDM_MALLOC_POLICY"] = policy
            cases.append(run_child(Path(__file__), ["--resolution", str(args.resolution), "--threads",
                                                    str(args.threads), "--precision", precision]))
    if args.json:
        print(json.dumps({"machine": machine(), "resolution": args.resolution, "cases": cases}))
        return
    print(f"{machine()}\none outer iteration, tiny model, {args.resolution} px, {args.threads} threads")
    columns = ("policy", "precision", "seconds", "system_seconds", "minor_faults", "pgd_step_seconds",
               "ft_step_seconds", "peak_rss_mb", "rss_after_run_mb")
    print("  ".join(f"{c:>16}" for c in columns))
    for case in cases:
        print("  ".join(f"{case[c]!s:>16}" for c in columns))


if __name__ == "__main__":
    main()
