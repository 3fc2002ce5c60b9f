"""The privacy tax: what IDDM costs over plain LoRA DreamBooth on the same photos and model.

    python benchmarks/bench_privacy_tax.py [--quick] [--threads 1] [--base tiny] [--device cpu]

1. IDDM vs plain: the same K x 2 fine-tune calls of ft_steps each, same photos (the demo's sample
   private set: one real face, augmented), same model, same seed; plain = pgd_steps 0 (no photo
   update, no recognizers). Each side runs in a fresh child process, side by side in this run;
   wall time, CPU time and peak memory (see benchmarks/common.py for how memory is measured).
2. The cost of one PGD step (Stage I and Stage II) relative to one fine-tune step.
3. How IDDM's total time grows with K, T, the number of photos and the resolution (tiny model).
Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IDDMConfig, load_photos, machine, mean, peak_rss_mb, rss_mb, run_child  # noqa: E402

BASE = dict(iterations=3, pgd_steps=8, rho=0.25, ft_steps=8, resolution=128, batch_size=2, eta=0.08,
            stage2_timesteps=(0, 20), recognizers=("dlib_resnet",), seed=0)
SURROGATE = "dlib_resnet"


def child(args: argparse.Namespace) -> None:
    """One measured run in this (fresh) process; prints one JSON line."""
    from comfyui_iddm.backends.diffusers_backend import load_denoiser
    from comfyui_iddm.faces.ensemble import IdentityEnsemble
    from comfyui_iddm.faces.registry import load_recognizers
    from comfyui_iddm.iddm import run_iddm

    torch.set_num_threads(args.threads)
    base = {**BASE, **({"resolution": args.resolution} if args.resolution else {})}
    config = IDDMConfig(**{**base, **json.loads(args.config)})
    reference, protection = load_photos(args.photos, config.resolution)
    denoiser = load_denoiser(args.base, config, device=args.device, config_dir=args.config_dir)
    setup_rss = rss_mb()
    phases: dict[str, list[tuple[float, float]]] = {}
    last = [(0.0, 0.0)]

    def on_progress(event) -> None:
        now = (time.perf_counter(), time.process_time())
        phase = "finetune" if event.phase.startswith("finetune") else event.phase
        phases.setdefault(phase, []).append((now[0] - last[0][0], now[1] - last[0][1]))
        last[0] = now

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start, cpu = time.perf_counter(), time.process_time()
    scorer = None
    if config.pgd_steps > config.stage1_steps:  # IDDM: the recognizers are part of its cost
        recognizers = load_recognizers([SURROGATE], args.weights_dir, denoiser.device)
        scorer = IdentityEnsemble.from_reference(recognizers, reference.images.to(denoiser.device),
                                                 reference.landmarks.to(denoiser.device), config.tau)
    last[0] = (time.perf_counter(), time.process_time())
    run_iddm(denoiser, reference.images, protection.images, protection.landmarks, scorer, config,
             on_progress=on_progress)
    figures = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
               "peak_rss_mb": peak_rss_mb(), "setup_rss_mb": setup_rss,
               # the first step of a phase pays one-off costs (allocations, autograd set-up): skipped
               "step_seconds": {phase: mean(w for w, _ in values[1:] or values) for phase, values in phases.items()},
               "step_cpu_seconds": {phase: mean(c for _, c in values[1:] or values)
                                    for phase, values in phases.items()}}
    if args.device.startswith("cuda"):
        figures["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(figures))


def measure(args: argparse.Namespace, **changes) -> dict:
    argv = ["--config", json.dumps(changes), "--photos", str(args.photos), "--threads", str(args.threads),
            "--base", args.base, "--device", args.device]
    if args.weights_dir:
        argv += ["--weights-dir", str(args.weights_dir)]
    if args.config_dir:
        argv += ["--config-dir", args.config_dir]
    if args.resolution:
        argv += ["--resolution", str(args.resolution)]
    return run_child(Path(__file__), argv)


def extra_mb(run: dict) -> float:
    return run["peak_rss_mb"] - run["setup_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer scaling points (a few minutes on 2 cores)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    parser.add_argument("--photos", type=int, default=8, help="photos in the private set (half protected)")
    parser.add_argument("--base", default="tiny", help="'tiny' or a real SD checkpoint / diffusers folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config-dir", default=None)
    parser.add_argument("--resolution", type=int, default=None,
                        help="training resolution of the comparison (default 128; e.g. 512 for a real model)")
    parser.add_argument("--weights-dir", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    print(f"machine: {machine()}")
    print(f"settings: {BASE}, {args.photos} photos, base {args.base}, device {args.device}, "
          f"{args.threads} thread(s)\n")
    iddm = measure(args)
    plain = measure(args, pgd_steps=0, rho=0.0)
    k, ft = BASE["iterations"], BASE["ft_steps"]
    print(f"1. privacy tax (K={k}, {2 * k * ft} fine-tune steps on both sides, {BASE['pgd_steps']} PGD steps "
          f"per iteration for IDDM)")
    print(f"   {'':22}{'wall s':>9}{'CPU s':>9}{'peak RSS MB':>13}{'training adds MB':>18}")
    for name, run in (("plain LoRA DreamBooth", plain), ("IDDM", iddm)):
        print(f"   {name:22}{run['seconds']:9.1f}{run['cpu_seconds']:9.1f}{run['peak_rss_mb']:13.0f}"
              f"{extra_mb(run):18.0f}")
    print(f"   ratio IDDM / plain: wall x{iddm['seconds'] / plain['seconds']:.2f}, CPU "
          f"x{iddm['cpu_seconds'] / plain['cpu_seconds']:.2f}, peak RSS x{iddm['peak_rss_mb'] / plain['peak_rss_mb']:.2f}")
    if "peak_vram_mb" in iddm:
        print(f"   peak VRAM: IDDM {iddm['peak_vram_mb']:.0f} MB, plain {plain['peak_vram_mb']:.0f} MB")

    print(f"\n2. one step: fine-tune batch {BASE['batch_size']}; PGD on all {args.photos // 2} protected photos at once")
    for clock, key in (("wall", "step_seconds"), ("CPU", "step_cpu_seconds")):
        steps, ft_step = iddm[key], plain[key]["finetune"]
        stage1, stage2 = steps.get("stage1", float("nan")), steps.get("stage2", float("nan"))
        print(f"   {clock:4} s: fine-tune {ft_step:.3f}, Stage I {stage1:.3f} (x{stage1 / ft_step:.2f}), "
              f"Stage II {stage2:.3f} (x{stage2 / ft_step:.2f})")

    sweeps = {"K (iterations)": ("iterations", [1, 3] if args.quick else [1, 2, 3, 6]),
              "T (pgd_steps)": ("pgd_steps", [4, 8] if args.quick else [4, 8, 16]),
              "resolution px": ("resolution", [128, 256] if args.quick else [128, 256, 512])}
    print("\n3. scaling of IDDM's total time, wall s (CPU s); other settings as above")
    for label, (knob, values) in sweeps.items():
        cells = []
        for value in values:
            effective = args.resolution if knob == "resolution" and args.resolution else BASE[knob]
            run = iddm if value == effective else measure(args, **{knob: value})
            cells.append(f"{value}: {run['seconds']:.1f} ({run['cpu_seconds']:.1f})")
        print(f"   {label:16} " + "   ".join(cells))
    cells = []
    for count in ([4, 8] if args.quick else [4, 8, 16]):
        child_args = argparse.Namespace(**{**vars(args), "photos": count})
        run = iddm if count == args.photos else measure(child_args)
        cells.append(f"{count}: {run['seconds']:.1f} ({run['cpu_seconds']:.1f})")
    print(f"   {'photos (half X0)':16} " + "   ".join(cells))


if __name__ == "__main__":
    main()
