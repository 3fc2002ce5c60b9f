"""The paper's Table 5 on real photos: for each eta, PSNR/SSIM of X' against X0 and the similarity
drop under a surrogate (attacked) and a held-out recognizer (only measured), beside the paper.

    python benchmarks/bench_table5.py [--etas 0.05,0.08,0.10,0.15] [--photos-dir DIR]
                                      [--weights-dir DIR] [--resolution 256]
    # GPU users, a real model (seconds per identity and peak VRAM at the paper's settings):
    python benchmarks/bench_table5.py --device cuda --base sd15.safetensors --config-dir SD15_CONFIG \\
                                      --photos-dir ONE_PERSON --etas 0.08

On `tiny` the settings are the demo's (comfyui_iddm/demo.py); on a real model the paper's (K=10,
T=8, alpha 0.008, 512 px). "control" is X0 plus the same change as X' at shuffled positions (same
L-inf, same PSNR): noise of that strength without IDDM's structure. Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IDDMConfig, load_photos, machine, timed_iddm  # noqa: E402

from comfyui_iddm.config import parse_list  # noqa: E402
from comfyui_iddm.report import PAPER_TABLE5  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--etas", default="0.05,0.08,0.10,0.15")
    parser.add_argument("--photos-dir", type=Path, default=None,
                        help="one person's photos (default: the demo's sample private set)")
    parser.add_argument("--photos", type=int, default=8, help="size of the sample private set (no --photos-dir)")
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config-dir", default=None, help="local diffusers config folder for a single file")
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="face-recognizer weights; every present one besides the surrogates is held out")
    parser.add_argument("--recognizers", default="dlib_resnet", help="surrogates attacked in Stage II")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from comfyui_iddm.backends.diffusers_backend import load_denoiser
    from comfyui_iddm.demo import DEMO_CONFIG, add_shuffled_control
    from comfyui_iddm.faces.registry import available_recognizers

    surrogates = parse_list(args.recognizers)
    base_settings = dict(DEMO_CONFIG) if args.base == "tiny" else dict(IDDMConfig().to_dict())
    base_settings.update(recognizers=surrogates, **{k: getattr(args, k) for k in ("resolution", "iterations")
                                                    if getattr(args, k) is not None})
    held_out = [n for n in available_recognizers(args.weights_dir) if n not in surrogates]
    print(f"machine: {machine()}")
    print(f"base {args.base} on {args.device}; settings {base_settings}; surrogates {list(surrogates)}; "
          f"held-out {held_out or 'none available'}")
    reference, protection = load_photos(args.photos, base_settings["resolution"], args.photos_dir)
    print(f"photos: {len(reference)} reference + {len(protection)} protected at {base_settings['resolution']} px\n")

    header = (f"{'eta':>5} | {'PSNR':>5} {'SSIM':>5} | {'paper PSNR':>10} {'SSIM':>5} | "
              + " | ".join(f"{n} ({'surrogate' if n in surrogates else 'held-out'}) before->after [control]"
                           for n in (*surrogates, *held_out)) + " | seconds")
    print(header)
    for eta in (float(e) for e in parse_list(args.etas)):
        config = IDDMConfig(**{**base_settings, "eta": eta})
        denoiser = load_denoiser(args.base, config, device=args.device, config_dir=args.config_dir)
        timed = timed_iddm(denoiser, reference, protection, config, weights_dir=args.weights_dir,
                           evaluators=held_out)
        report = dict(timed.result.report)
        add_shuffled_control(report, reference, protection, timed.result.decoupled, args.weights_dir, config)
        paper = PAPER_TABLE5.get(round(eta, 2))
        paper_text = f"{paper[0]:10.1f} {paper[1]:5.2f}" if paper else f"{'-':>10} {'-':>5}"
        d = report["decoupled"]
        cells = [f"{r['before']:.3f}->{r['after']:.3f} [{r['control']:.3f}]" for r in report["identity"]]
        vram = f", peak VRAM {timed.peak_mb:.0f} MB" if args.device.startswith("cuda") else ""
        print(f"{eta:5.2f} | {d['psnr']:5.1f} {d['ssim']:5.3f} | {paper_text} | " + " | ".join(cells)
              + f" | {timed.seconds:.0f} s per identity{vram}", flush=True)
        del denoiser
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
