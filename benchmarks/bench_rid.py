"""RID's cloaking speed: seconds per photo at 512 px, one forward pass of the network.

The network's weights do not change its speed, so random ones stand in for trained ones: the
authors' published size (their DiT: patch 16, 14 blocks of width 1152, 225 M parameters; the
paper: 1.1 s per photo on a desktop Intel i9 CPU, 0.12 s on an A100) and our CPU-trainable 'small'
one. Per case: parameters, set-up, the first call and the median wall and CPU time of the timed calls
(one photo per call, as a phone or a web form would cloak; on a shared machine the CPU time of one
thread is the steadier figure). Figures only, no asserts.

    python benchmarks/bench_rid.py [--threads 1,2] [--repeats 5] [--resolution 512] [--device cpu]
    (one photo per call; the photo moves to --device inside the timed call, as a real one would)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine

from comfyui_iddm.rid import ARCHITECTURES, RIDNet, cloak_photos

PAPER = {"published": "paper: 1.1 s on an Intel i9 CPU, 0.12 s on an A100"}


def time_case(architecture: str, resolution: int, repeats: int, device: str) -> dict:
    started = time.perf_counter()
    net = RIDNet(ARCHITECTURES[architecture], budget=0.025).to(device).eval()
    set_up = time.perf_counter() - started
    photo = torch.rand(1, 3, resolution, resolution)
    times, cpu_times = [], []
    for _ in range(repeats + 1):  # the first call pays for allocations and kernel selection
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        cloak_photos(net, photo)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    return {"architecture": architecture, "parameters_m": sum(p.numel() for p in net.parameters()) / 1e6,
            "set_up_s": set_up, "first_s": times[0], "median_s": statistics.median(times[1:]),
            "median_cpu_s": statistics.median(cpu_times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="torch CPU thread counts to run (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case after one warm-up")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--architectures", default="published,small")
    args = parser.parse_args()
    print(machine())
    threads = [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [torch.get_num_threads()]
    for count in threads:
        torch.set_num_threads(count)
        for architecture in args.architectures.split(","):
            case = time_case(architecture, args.resolution, args.repeats, args.device)
            print(f"{architecture:9s} {case['parameters_m']:7.1f} M params, {args.device} {count} thread(s), "
                  f"float32, {args.resolution} px: {case['median_s']:.3f} s per photo, CPU time "
                  f"{case['median_cpu_s']:.3f} s (first call "
                  f"{case['first_s']:.2f} s, set-up {case['set_up_s']:.1f} s)"
                  + (f"  [{PAPER[architecture]}]" if architecture in PAPER else ""))


if __name__ == "__main__":
    main()
