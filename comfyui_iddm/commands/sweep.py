"""`iddm sweep --rho 0.1,0.3,0.5 [PHOTOS_DIR] --out DIR`: one IDDM run per rho, the privacy-utility curve."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    from ..cli import add_class_image_flags, add_knob_flags

    p = subparsers.add_parser(
        "sweep", help="train once per rho and plot the privacy-utility curve",
        description="Runs IDDM once per rho (everything else equal, same seed) and writes "
                    "lora_rho<R>.safetensors per run, sweep.json, sweep.png (similarity of X' to the "
                    "person against the PSNR of X', per recognizer) and sweep.html into --out. Without "
                    "PHOTOS_DIR it uses the demo's sample private set on the tiny model.",
        conflict_handler="resolve")  # the sweep's --rho (a list) replaces the knob flag --rho
    p.add_argument("photos_dir", type=Path, nargs="?", default=None,
                   help="folder of the person's photos (default: the demo's sample set)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--base", default="tiny", help="'tiny', a diffusers model folder or a single-file checkpoint")
    p.add_argument("--reference", type=int, default=None, help="photos in the reference set (default: half)")
    p.add_argument("--weights-dir", type=Path, default=None, help="folder with face-recognizer weights")
    p.add_argument("--evaluators", default=None,
                   help="held-out recognizers to measure (default: every present one not attacked)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--config-dir", default=None, help="local diffusers config folder for single-file checkpoints")
    add_class_image_flags(p)
    add_knob_flags(p)
    p.add_argument("--rho", dest="rhos", required=True, help="comma-separated rho values, e.g. 0.1,0.3,0.5")
    p.set_defaults(func=run, rho=None)


def run(args: argparse.Namespace) -> int:
    from ..class_images import ClassImagePlan
    from ..cli import ProgressBar, config_from_args
    from ..config import ConfigError, parse_list
    from ..photos import load_photo_folder, split_photos
    from ..sweep import run_sweep

    try:
        rhos = [float(r) for r in parse_list(args.rhos)]
    except ValueError:
        raise ConfigError(f"--rho {args.rhos!r} is not a comma-separated list of numbers (e.g. 0.1,0.3,0.5).") from None
    class_plan = ClassImagePlan.check(args.class_dir, args.num_class_images, config_from_args(args))
    with ProgressBar() as progress:
        if args.photos_dir is None:
            from ..demo import DEMO_CONFIG, DEMO_REFERENCE, sample_private_set
            from ..faces.detect import MTCNNDetector
            config = config_from_args(args)
            config = config.replace(**{k: v for k, v in DEMO_CONFIG.items() if getattr(args, k, None) is None})
            photos = sample_private_set(config.resolution, MTCNNDetector(), seed=config.seed)
            n_reference = args.reference or DEMO_REFERENCE
        else:
            from ..faces.detect import load_detector
            config = config_from_args(args)
            photos = load_photo_folder(args.photos_dir, config.resolution, load_detector("auto", args.device))
            for issue in photos.issues:
                progress.write(f"{issue.name}: {issue.reason}")
            n_reference = args.reference or len(photos) // 2
        reference, protection = split_photos(photos, n_reference, "order", config.seed)
        sweep = run_sweep(rhos, args.out, config, reference, protection, base=args.base,
                          weights_dir=args.weights_dir, class_plan=class_plan,
                          evaluators=parse_list(args.evaluators) if args.evaluators else None,
                          device=args.device, config_dir=args.config_dir, on_progress=progress.update,
                          log=progress.write)
    for point in sweep["points"]:
        figures = ", ".join(f"{r['recognizer']} {r['before']:.3f}->{r['after']:.3f}" for r in point["identity"])
        print(f"rho {point['rho']:g}: PSNR {point['decoupled']['psnr']:.1f} dB; {figures}")
    print(f"sweep written: {args.out / 'sweep.html'}")
    return 0
