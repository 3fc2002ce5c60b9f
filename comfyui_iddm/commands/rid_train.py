"""`iddm rid-train FACES_DIR --base tiny[,BASE2...] --out RID.safetensors`: train RID's cloaking network.

Face crops from the folder (any people; the network learns to cloak faces it has never seen), Adv-SDS
over every base model (the ensemble variant when there are several) plus the regulariser on pairs
made by ASPL at the same budget (rid.py). The file's header holds the settings, nothing about the
faces; file names are printed for the user's terminal only.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

PAIR_CHOICES = ("aspl", "none")


def add_parser(subparsers) -> None:
    from ..rid import ARCHITECTURES, RIDSettings

    defaults = RIDSettings()
    p = subparsers.add_parser(
        "rid-train", help="train RID's network that cloaks a photo in one forward pass",
        description="Trains RID (arXiv 2412.09844): a small image-to-perturbation network bounded by the "
                    "budget, with Adv-SDS on the base model(s) plus a regression onto ASPL's perturbations "
                    "of the same faces. Use it with `iddm cloak --method rid --rid-weights FILE`.")
    p.add_argument("faces_dir", type=Path, help="folder of face photos (many people; JPEG/PNG/WebP)")
    p.add_argument("--base", required=True,
                   help="'tiny', a diffusers model folder or a single-file SD1.x/SD2.x checkpoint; several "
                        "separated by commas train the ensemble variant (Adv-SDS averaged over them)")
    p.add_argument("--out", required=True, type=Path, help="network file to write (.safetensors)")
    p.add_argument("--architecture", choices=sorted(ARCHITECTURES), default=defaults.architecture,
                   help="'small' (default; trains on a CPU) or 'published' (the authors' size, 225 M "
                        "parameters: a GPU)")
    p.add_argument("--eta", type=float, default=defaults.eta,
                   help="budget: largest change of any pixel, in --pixel-range units (default %(default)s, "
                        "as `iddm cloak`; the authors released 6, 8 and 12/255)")
    p.add_argument("--pixel-range", choices=["-1,1", "0,1"], default=defaults.pixel_range,
                   help="pixel scale --eta is given in (default %(default)s, the papers')")
    for name, kind, text in (("resolution", int, "side of the face crops in pixels"),
                             ("steps", int, "optimizer steps"), ("batch_size", int, "faces per step"),
                             ("lr", float, "AdamW learning rate (the authors')"),
                             ("weight_decay", float, "AdamW weight decay (the authors')"),
                             ("reg_weight", float, "weight of the regulariser (MSE to ASPL's perturbation)"),
                             ("seed", int, "seed of every random choice")):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=getattr(defaults, name),
                       help=f"{text} (default %(default)s)")
    p.add_argument("--timesteps", default=",".join(map(str, defaults.timesteps)),
                   help="range lo,hi of diffusion timesteps Adv-SDS draws from (default %(default)s: all)")
    p.add_argument("--prompt", default=defaults.prompt,
                   help="conditioning of the base model (default: the empty prompt, as the authors)")
    p.add_argument("--pairs", choices=PAIR_CHOICES, default="aspl",
                   help="the regulariser's pairs: 'aspl' (the faces cloaked by ASPL at the same budget, made "
                        "here first; default) or 'none' (Adv-SDS only, the authors' ablation)")
    p.add_argument("--pair-iterations", type=int, default=10,
                   help="ASPL's outer iterations per group of faces when making pairs (default %(default)s; "
                        "Anti-DreamBooth: 50)")
    p.add_argument("--pair-group", type=int, default=8,
                   help="faces per ASPL run when making pairs (default %(default)s; neighbouring files are "
                        "usually one person)")
    p.add_argument("--detector", choices=["auto", "mtcnn", "scrfd", "none"], default="auto",
                   help="face detector for cropping (none: the photos are centred face crops)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                   help="compute dtype of the base model(s) (the network trains in float32)")
    p.add_argument("--config-dir", default=None,
                   help="local diffusers config folder for single-file checkpoints (offline use)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    from ..config import parse_range
    from ..rid import RIDSettings

    values = {f.name: getattr(args, f.name) for f in fields(RIDSettings) if f.name != "timesteps"}
    return RIDSettings(**values, timesteps=parse_range(args.timesteps))


def parse_bases(text: str) -> list[str]:
    from ..config import ConfigError, parse_list

    bases = list(parse_list(text))
    repeated = sorted({b for b in bases if bases.count(b) > 1})
    if not bases or repeated:
        raise ConfigError(f"--base {text!r}: " + (f"{', '.join(repeated)} is listed twice; give each base "
                                                  "model once." if repeated else "give at least one base model."))
    return bases


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import atomic
    from ..backends.diffusers_backend import load_denoiser
    from ..cloak import change_figures
    from ..config import ConfigError, IDDMConfig
    from ..photos import load_photo_folder
    from ..rid import aspl_pairs, cloak_photos, train_rid
    from ..rid_weights import rid_metadata, save_rid

    settings = settings_from_args(args)
    bases = parse_bases(args.base)
    for name, value in (("--pair-iterations", args.pair_iterations), ("--pair-group", args.pair_group)):
        if value < 1:
            raise ConfigError(f"{name} {value}: give a whole number of at least 1.")
    atomic.check_writable(args.out, args.overwrite, example="rid.safetensors")
    if args.threads:
        torch.set_num_threads(args.threads)

    detector = None
    if args.detector != "none":
        from ..faces.detect import load_detector
        detector = load_detector(args.detector, device=args.device)
    faces = load_photo_folder(args.faces_dir, settings.resolution, detector)
    for issue in faces.issues:
        print(f"{issue.name}: {issue.reason}", file=sys.stderr)
    if len(faces) < settings.batch_size:
        raise ConfigError(f"{args.faces_dir} gave {len(faces)} usable face(s), fewer than --batch-size "
                          f"{settings.batch_size}; add face photos (hundreds of people train a network "
                          "that generalises) or lower --batch-size.")
    model_config = IDDMConfig(resolution=settings.resolution, seed=settings.seed,
                              mixed_precision=args.mixed_precision)
    denoisers = [load_denoiser(base, model_config, device=args.device, config_dir=args.config_dir)
                 for base in bases]

    targets = None
    if args.pairs == "aspl":
        print(f"making the regulariser's pairs: ASPL on {len(faces)} faces, {args.pair_group} per run, "
              f"{args.pair_iterations} iterations", file=sys.stderr)
        targets = aspl_pairs(faces.images, denoisers[0], settings, args.pair_iterations, args.pair_group,
                             on_group=lambda done, total: print(f"  pairs: group {done}/{total}", file=sys.stderr))
    report_every = max(1, settings.steps // 20)

    def on_step(step) -> None:
        if step.step % report_every == 0 or step.step == step.steps:
            reg = "" if step.regulariser is None else f", regulariser {step.regulariser:.2e}"
            print(f"  step {step.step}/{step.steps}: denoising error on the cloaked faces "
                  f"{step.denoising_error:.4f}{reg}", file=sys.stderr)

    training = train_rid(faces.images, denoisers, settings, targets=targets, on_step=on_step)
    kinds = ["tiny" if b == "tiny" else (d.base_model_version or "diffusers") for b, d in zip(bases, denoisers)]
    regulariser = "none" if targets is None or settings.reg_weight == 0 else \
        f"aspl pairs ({args.pair_iterations} iterations, groups of {args.pair_group})"
    save_rid(args.out, training.net, rid_metadata(settings, kinds, regulariser), overwrite=args.overwrite)

    cloaked = cloak_photos(training.net, faces.images)
    fidelity = change_figures(cloaked, faces.images)
    params = sum(p.numel() for p in training.net.parameters())
    tenth = max(1, len(training.history) // 10)
    print(f"RID network written: {args.out}")
    print(f"network: {settings.architecture} ({params / 1e6:.2f} M parameters), budget eta {settings.eta:g} "
          f"in {settings.pixel_range} units ({settings.budget:.4f} of the [0,1] range)")
    print(f"training: {len(faces)} faces, {settings.steps} steps on {len(bases)} base model(s) in "
          f"{training.seconds:.0f} s; denoising error on the cloaked faces (Adv-SDS raises it) "
          f"{mean_error(training.history[:tenth]):.4f} -> {mean_error(training.history[-tenth:]):.4f}")
    print(f"the cloak on the training faces: largest pixel change {fidelity['linf']:.4f}, PSNR "
          f"{fidelity['psnr']:.1f} dB, SSIM {fidelity['ssim']:.3f}")
    return 0


def mean_error(steps) -> float:
    return sum(step.denoising_error for step in steps) / len(steps)
