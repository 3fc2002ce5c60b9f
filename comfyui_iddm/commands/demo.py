"""`iddm demo`: the main job on an embedded default (sample face, tiny model, offline recognizers)."""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path("iddm-demo")


def add_parser(subparsers) -> None:
    from ..demo import DEMO_CONFIG, DEMO_PHOTOS, DEMO_REFERENCE

    p = subparsers.add_parser(
        "demo", help="run IDDM end to end on built-in sample data (no GPU, no downloads)",
        description=(
            "Builds a small private set from one face in a sample photo that ships with the "
            "insightface package, trains a protected LoRA on the built-in tiny model with dlib's face "
            "ResNet as the surrogate (any other recognizer in the weights folder is a held-out "
            "evaluator), and writes the LoRA, the protected photos X', report.json and report.html "
            "into one folder. Demo settings: " + ", ".join(f"{k}={v}" for k, v in DEMO_CONFIG.items()
                                                           if k != "recognizers") + "."))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"output folder (default ./{DEFAULT_OUT}); the demo's own files there are replaced")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="folder with face-recognizer weights; any found besides the surrogate are "
                        "held-out evaluators (default $IDDM_WEIGHTS_DIR or the user cache)")
    p.add_argument("--photos", type=int, default=DEMO_PHOTOS, help="augmented sample photos (default %(default)s)")
    p.add_argument("--reference", type=int, default=DEMO_REFERENCE,
                   help="of them in the reference set (default %(default)s)")
    for name, kind in (("iterations", int), ("pgd_steps", int), ("ft_steps", int), ("rho", float),
                       ("eta", float), ("resolution", int), ("seed", int)):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                       help=f"override the demo's {name} (default {DEMO_CONFIG[name]})")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tiny model's operations are small, and on a busy "
                        "machine more threads made each step up to 10x slower here)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..cli import ProgressBar
    from ..demo import demo_config, run_demo

    torch.set_num_threads(max(1, args.threads))
    overrides = {k: getattr(args, k) for k in ("iterations", "pgd_steps", "ft_steps", "rho", "eta",
                                               "resolution", "seed") if getattr(args, k) is not None}
    with ProgressBar() as progress:
        run_demo(args.out, demo_config(**overrides), weights_dir=args.weights_dir, photos=args.photos,
                 reference=args.reference, on_progress=progress.update, log=progress.write)
    return 0
