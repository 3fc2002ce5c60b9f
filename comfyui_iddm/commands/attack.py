"""`iddm attack PHOTOS_DIR --base tiny --out LORA`: personalize a model on published photos the way
someone misusing them would (plain DreamBooth-LoRA, attack.py), to see what a protection leaves them.

The LoRA file carries the kohya `ss_*` keys only: no IDDM settings (it is not a protected LoRA) and
nothing about the photos.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    from ..attack import ATTACK_DEFAULTS, ATTACK_KNOBS
    from ..cli import add_knob_flags
    from .cloak import add_model_flags

    p = subparsers.add_parser(
        "attack", help="personalize a model on published photos, as a misuser would (to test a protection)",
        description="Plain DreamBooth-LoRA on the photos' face crops: the instance prompt, a fixed step "
                    "budget (--ft-steps), optional prior preservation. The attacker `iddm evaluate-protection` "
                    "runs against every protection. Writes a kohya LoRA (.safetensors).")
    p.add_argument("photos_dir", type=Path, help="folder of the (published, perhaps cloaked) photos")
    p.add_argument("--base", required=True,
                   help="'tiny', a diffusers model folder or a single-file SD1.x/SD2.x checkpoint")
    p.add_argument("--out", required=True, type=Path, help="LoRA file to write (.safetensors)")
    p.add_argument("--detector", choices=["auto", "mtcnn", "scrfd", "none"], default="auto",
                   help="face detector for the crops (none: the photos are face-centred crops already)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing LoRA file")
    add_model_flags(p)
    add_knob_flags(p, ATTACK_KNOBS, ATTACK_DEFAULTS, title="attacker settings",
                   help_for={"ft_steps": "the attacker's fixed step budget: optimizer steps of its one fine-tune"})
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import atomic
    from ..attack import ATTACK_KNOBS, attack_config, attack_photos
    from ..class_images import ClassImagePlan
    from ..cli import ProgressBar, knob_values
    from ..lora_io import kohya_metadata, save_lora
    from .cloak import photos_and_model, use_threads

    use_threads(args.threads)
    config = attack_config(**knob_values(args, ATTACK_KNOBS))
    class_plan = ClassImagePlan.check(args.class_dir, args.num_class_images, config)
    atomic.check_writable(args.out, args.overwrite, "attack.safetensors")
    with ProgressBar() as progress:
        photos, denoiser, class_images = photos_and_model(args, args.photos_dir, config, class_plan, progress)
        result = attack_photos(denoiser, photos.images, config, class_images=class_images,
                               on_progress=progress.update)
    save_lora(args.out, result.lora, kohya_metadata(config, getattr(denoiser, "base_model_version", None)),
              overwrite=args.overwrite)
    print(f"attacker's LoRA written: {args.out}")
    print(f"{len(photos)} photo(s), {config.ft_steps} fine-tune steps, loss {result.losses[0]:.4f} -> "
          f"{result.losses[-1]:.4f}, {result.seconds:.1f} s")
    return 0
