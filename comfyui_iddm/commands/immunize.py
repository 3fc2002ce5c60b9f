"""`iddm immunize --base MODEL --subject PHOTOS_DIR --out PROTECTED`: a model that will not learn one
person (APDM, apdm.py), for a model provider to publish instead of the base model.

What is written depends on --protect-weights: 'unet' (the paper's choice, the default) changes every
UNet weight and writes a UNet checkpoint; 'lora' writes a kohya LoRA. The file's header records the
settings and aggregate figures only: nothing about the person's photos (no names, paths or hashes).
Each finished iteration is kept beside --out (`.NAME.iddm-state`) until the file is written, so an
interrupted run continues with --resume, as `iddm train` does.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def add_parser(subparsers) -> None:
    from ..apdm import APDM_KNOBS, APDMConfig
    from ..cli import add_knob_flags
    from .cloak import add_model_flags

    p = subparsers.add_parser(
        "immunize", help="make a model that will not learn one person (APDM), even from clean photos",
        description="APDM (arXiv 2511.01307): fine-tunes the base model with the DPO loss along simulated "
                    "DreamBooth personalizations of the person (L2P), so that a later personalization on "
                    "their photos fails while the model still denoises, and learns, everyone else. Needs "
                    "class images of other people (--class-dir; DPO's preferred side and prior "
                    "preservation). Measure it with `iddm evaluate-protection --protected-model`.")
    p.add_argument("--base", required=True,
                   help="'tiny', a diffusers model folder or a single-file SD1.x/SD2.x checkpoint")
    p.add_argument("--subject", required=True, type=Path, help="folder of photos of the person to protect")
    p.add_argument("--out", required=True, type=Path,
                   help="the protected model to write (.safetensors): a UNet checkpoint or a LoRA "
                        "(--protect-weights)")
    p.add_argument("--detector", choices=["auto", "mtcnn", "scrfd", "none"], default="auto",
                   help="face detector for the crops (none: the photos are face-centred crops already)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last finished iteration (same command otherwise)")
    add_model_flags(p)
    add_knob_flags(p, defaults={}, config_class=APDMConfig, knobs=APDM_KNOBS,
                   title="APDM settings (defaults: the authors')")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import atomic
    from ..apdm import APDMConfig, run_apdm
    from ..apdm_weights import FORM_TEXT, save_protection
    from ..class_images import ClassImagePlan
    from ..cli import ProgressBar, interrupt_message, knob_values
    from ..config import ConfigError
    from ..run_state import prepare_state_dir, state_dir_beside
    from .cloak import photos_and_model, use_threads

    use_threads(args.threads)
    config = APDMConfig(**knob_values(args, config_class=APDMConfig))
    ft_config = config.fine_tune_config()
    class_plan = ClassImagePlan.check(args.class_dir, args.num_class_images, ft_config,
                                      needed_by="DPO (its preferred side)" if config.protect_loss == "dpo" else None)
    if args.out.suffix.lower() != ".safetensors":
        raise ConfigError(f"--out {args.out.name}: the protected model is written as .safetensors; "
                          "give a name ending in .safetensors.")
    atomic.check_writable(args.out, args.overwrite, "protected.safetensors")
    state_dir = prepare_state_dir(state_dir_beside(args.out), args.resume, args.out.name)
    with interrupt_message(state_dir, "protected model"):
        with ProgressBar() as progress:
            subject, denoiser, class_images = photos_and_model(args, args.subject, ft_config, class_plan, progress)
            result = run_apdm(denoiser, subject.images, config, class_images=class_images,
                              on_progress=progress.update, state_dir=state_dir)
        save_protection(args.out, result, config, getattr(denoiser, "base_model_version", None), args.overwrite)
    shutil.rmtree(state_dir, ignore_errors=True)  # written: nothing left to resume
    f = result.figures
    print(f"protected model written: {args.out}")
    print(f"  {FORM_TEXT[result.form]}")
    print(f"{len(subject)} photo(s) of the person, {config.iterations} iteration(s) of {config.ft_steps} "
          f"simulated personalization step(s), loss {config.protect_loss}, {result.seconds_total:.1f} s")
    print(f"denoising loss of the base -> the protected model (same noise): the person's photos "
          f"{f['subject_loss_base']:.4f} -> {f['subject_loss_protected']:.4f}"
          + (f"; other people (class images) {f['others_loss_base']:.4f} -> {f['others_loss_protected']:.4f}"
             if "others_loss_base" in f else ""))
    return 0
