"""Fidelity against privacy: how much held-out identity each option buys per dB of PSNR.

    python benchmarks/bench_fidelity.py [--photos-dir DIR] [--reference N] [--etas 0.03,0.05,0.08,0.10,0.15]
        [--variants paper,face_mask,...] [--surrogate dlib_resnet] [--held-out mobilefacenet]
        [--weights-dir DIR] [--resolution 256] [--iterations K] [--pgd-steps T] [--ft-steps N]
        [--stage2-timesteps 0,20]
        [--plot FILE.png] [--json FILE] [--strips DIR]

For each variant and eta: one IDDM run on the tiny model with one surrogate recognizer attacked and one
held out (only measured), and the figures of X' against X0: PSNR, SSIM, the share of the squared
change that lies outside the aligned face region, and the relative drop of each recognizer's cosine
to the person (X' against X0, i.e. against the same run at pgd_steps 0, whose X' is X0). Variants:
`paper` (Algorithm 1 as written: the whole frame changes), `face_mask` (the default here), `target`
(target_similarity), `decay` (step_decay), `all` (the three together), and `paper_0_1` (eta and
alpha read in [0,1] units: the budget-scale question). `target` and `decay` run without the mask.
The curve (held-out drop against PSNR) goes to --plot. Figures only, never asserted.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IDDMConfig, load_photos, machine, timed_iddm  # noqa: E402

from comfyui_iddm.config import parse_list  # noqa: E402

VARIANTS = {
    "paper": {"face_mask": False},
    "paper_0_1": {"pixel_range": "0,1", "face_mask": False},
    "face_mask": {"face_mask": True},
    "target": {"target_similarity": 0.3, "face_mask": False},
    "decay": {"step_decay": True, "face_mask": False},
    "all": {"face_mask": True, "target_similarity": 0.3, "step_decay": True},
}


def outside_face_share(x0: torch.Tensor, x1: torch.Tensor, landmarks: torch.Tensor) -> float:
    """Share of the squared change of X' that lies outside the aligned face region."""
    from comfyui_iddm.faces.region import face_region

    outside = face_region(landmarks, *x0.shape[-2:]) < 0.5
    change = (x1 - x0).pow(2).sum(dim=1, keepdim=True)
    return float((change * outside).sum() / change.sum().clamp_min(1e-12))


def run(config: IDDMConfig, reference, protection, weights_dir, held_out, strip: Path | None = None) -> dict:
    from comfyui_iddm.backends.diffusers_backend import load_denoiser
    from comfyui_iddm.report import strip_image

    timed = timed_iddm(load_denoiser("tiny", config), reference, protection, config,
                       weights_dir=weights_dir, evaluators=held_out)
    report = timed.result.report
    if strip is not None:  # X0 | X' | amplified change, to look at
        strip.write_bytes(strip_image(protection.images, timed.result.decoupled))
    drops = {row["recognizer"]: {"role": row["role"], "before": row["before"], "after": row["after"],
                                 "relative_drop": round(1 - row["after"] / row["before"], 4)}
             for row in report["identity"]}
    return {**report["decoupled"], "identity": drops, "seconds": round(timed.seconds, 1),
            "outside_face_share": round(outside_face_share(protection.images, timed.result.decoupled,
                                                           protection.landmarks), 3)}


def plot(rows: list[dict], held_out: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for variant in dict.fromkeys(r["variant"] for r in rows):
        points = sorted((r["psnr"], 100 * r["identity"][held_out]["relative_drop"], r["eta"])
                        for r in rows if r["variant"] == variant)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=variant)
        for psnr, drop, eta in points:
            ax.annotate(f"{eta:g}", (psnr, drop), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("PSNR of X' against the photos (dB)")
    ax.set_ylabel(f"held-out {held_out}: cosine drop (%)")
    ax.axvline(32.8, color="#999", ls="--", lw=0.8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos-dir", type=Path, default=None,
                        help="one person's photos (default: the demo's sample set, augmentations of one face)")
    parser.add_argument("--reference", type=int, default=None, help="photos in Xc (default: half)")
    parser.add_argument("--etas", default="0.03,0.05,0.08,0.10,0.15")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--surrogate", default="dlib_resnet")
    parser.add_argument("--held-out", default="mobilefacenet")
    parser.add_argument("--weights-dir", type=Path, default=None)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=None, help="K (default: the config's)")
    parser.add_argument("--pgd-steps", type=int, default=None)
    parser.add_argument("--ft-steps", type=int, default=None)
    parser.add_argument("--stage2-timesteps", default="0,20",
                        help="Stage II timestep range (the curve's runs: 0,20; the config default: 0,200)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strips", type=Path, default=None,
                        help="folder for one PNG per run: X0 | X' | amplified change")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.strips:
        args.strips.mkdir(parents=True, exist_ok=True)

    schedule = {k: v for k, v in (("iterations", args.iterations), ("pgd_steps", args.pgd_steps),
                                  ("ft_steps", args.ft_steps)) if v is not None}
    base = dict(resolution=args.resolution, recognizers=(args.surrogate,),
                stage2_timesteps=args.stage2_timesteps, **schedule)
    reference, protection = load_photos(8, args.resolution, args.photos_dir, args.reference)
    print(f"machine: {machine()}\nphotos: {len(reference)} reference + {len(protection)} protected at "
          f"{args.resolution} px; surrogate {args.surrogate}, held out {args.held_out}; settings "
          f"{IDDMConfig(**base).to_dict()}\n")
    print(f"{'variant':>10} {'eta':>5} | {'PSNR':>5} {'SSIM':>5} {'outside':>7} | "
          f"{'surrogate drop':>14} {'held-out drop':>13} | seconds")
    rows = []
    for variant in parse_list(args.variants):
        for eta in (float(e) for e in parse_list(args.etas)):
            config = IDDMConfig(**{**base, **VARIANTS[variant], "eta": eta})
            strip = args.strips / f"{variant}_{eta:g}.png" if args.strips else None
            row = {"variant": variant, "eta": eta,
                   **run(config, reference, protection, args.weights_dir, [args.held_out], strip)}
            rows.append(row)
            ids = row["identity"]
            print(f"{variant:>10} {eta:5.2f} | {row['psnr']:5.1f} {row['ssim']:5.3f} {row['outside_face_share']:7.2f} | "
                  f"{100 * ids[args.surrogate]['relative_drop']:13.1f}% {100 * ids[args.held_out]['relative_drop']:12.1f}% "
                  f"| {row['seconds']:.0f}", flush=True)
    if args.plot:
        plot(rows, args.held_out, args.plot)
        print(f"\ncurve: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "settings": IDDMConfig(**base).to_dict(),
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
