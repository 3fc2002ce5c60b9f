"""`iddm evaluate-protection --clean DIR (--method aspl,noise | --protected DIR) --base B`: how much of
the person an attacker learns from protected photos, for every protection the same way
(protection_eval.py), as one table. Prints figures only: no file names, no paths.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# The knobs the cloaks and the attacker share (one base model, one LoRA shape, one prompt).
SHARED_KNOBS = ("rank", "lora_alpha", "batch_size", "resolution", "seed", "instance_prompt", "class_prompt",
                "prior_weight", "mixed_precision", "gradient_checkpointing")


def add_parser(subparsers) -> None:
    from ..attack import ATTACK_DEFAULTS
    from ..cli import add_knob_flags
    from .cloak import add_model_flags
    from ..cloak import CLOAK_DEFAULTS, CLOAK_KNOBS, METHODS

    p = subparsers.add_parser(
        "evaluate-protection", help="measure protections against a DreamBooth-LoRA attacker, in one table",
        description="For each protection (cloak methods run here, and/or protected files you give), the "
                    "same attacker (plain DreamBooth-LoRA, fixed budget, same seed) personalizes the base "
                    "model on the protected photos; its model is then measured on held-out clean photos of "
                    "the person: its denoising loss, and the identity cosine of its one-step reconstruction "
                    "x0-hat (per face recognizer); with --generations, images from the papers' prompts "
                    "scored with FSR and identity cosine. Rows: the base model before any attack, the attack "
                    "on unprotected photos (none), then each protection.")
    p.add_argument("--clean", required=True, type=Path,
                   help="folder of clean photos of the person: the published ones (and, without --held-out, "
                        "the held-out ones too)")
    p.add_argument("--method", default=None,
                   help=f"comma-separated cloak methods to run here ({', '.join(METHODS)}); 'none' (no "
                        "protection) is always measured")
    p.add_argument("--protected", type=Path, default=None,
                   help="folder of protected versions of ALL --clean photos (same order, e.g. from "
                        "`iddm cloak --out`), at --resolution; needs --held-out")
    p.add_argument("--held-out", type=Path, default=None,
                   help="folder of other clean photos of the person, never published: what the attacker's "
                        "model is measured on")
    p.add_argument("--held-out-count", type=int, default=None,
                   help="without --held-out: how many of the --clean photos (the last ones) are held out "
                        "(default: half)")
    p.add_argument("--base", required=True,
                   help="'tiny', a diffusers model folder or a single-file SD1.x/SD2.x checkpoint: the "
                        "attacker's base model (and ASPL's)")
    p.add_argument("--attack-steps", type=int, default=ATTACK_DEFAULTS["ft_steps"],
                   help="the attacker's fixed budget: fine-tune steps (default %(default)s)")
    p.add_argument("--attack-lr", type=float, default=ATTACK_DEFAULTS["lr"],
                   help="the attacker's learning rate (default %(default)s)")
    p.add_argument("--generations", type=int, default=None,
                   help="images per prompt ('a photo of sks person', 'a dslr portrait of sks person') to "
                        "score with FSR and identity cosine (default 4 with a real model, 0 with tiny)")
    p.add_argument("--recognizers", default="auto",
                   help="face recognizers that measure (default auto: every one whose weights are present)")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="folder with face-recognizer weights (default $IDDM_WEIGHTS_DIR or the user cache)")
    p.add_argument("--rid-weights", type=Path, default=None, metavar="FILE",
                   help="the trained network of --method rid")
    p.add_argument("--detector", choices=["auto", "mtcnn", "scrfd", "none"], default="auto",
                   help="face detector for the crops, landmarks and generations (none: the photos are "
                        "face-centred crops already; no generations)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    add_model_flags(p)
    add_knob_flags(p, CLOAK_KNOBS, CLOAK_DEFAULTS,
                   title="cloak settings of the methods run here (defaults: Anti-DreamBooth's ASPL); "
                         "the attacker shares rank, lora alpha, batch size, resolution, seed, prompts, "
                         "prior weight and precision")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..attack import ATTACK_DEFAULTS, attack_config
    from ..class_images import ClassImagePlan
    from ..cli import knob_values
    from ..cloak import CLOAK_KNOBS, METHODS, cloak_config
    from ..config import ConfigError, parse_list
    from ..faces.detect import load_detector
    from ..faces.registry import load_recognizers, resolve_names
    from ..protection_eval import EvaluationSetup, attack_learnt, evaluate_protection
    from .cloak import base_model_loader, check_input_file, use_threads

    use_threads(args.threads)
    if args.attack_steps < 1:
        raise ConfigError(f"--attack-steps {args.attack_steps}: the attacker needs at least 1 fine-tune step "
                          f"(default {ATTACK_DEFAULTS['ft_steps']}).")
    knobs = knob_values(args, CLOAK_KNOBS)
    cloak = cloak_config(**knobs)
    attack = attack_config(ft_steps=args.attack_steps, lr=args.attack_lr,
                           **{k: v for k, v in knobs.items() if k in SHARED_KNOBS})
    methods = ["none"] + [m for m in parse_list(args.method or "") if m != "none"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--method {','.join(unknown)}: unknown; choose from {', '.join(METHODS)}.")
    if args.protected is not None and args.held_out is None:
        raise ConfigError("--protected needs --held-out: every --clean photo then counts as published, so "
                          "the attacker's model must be measured on other photos of the person.")
    if args.generations is not None and args.generations < 0:
        raise ConfigError(f"--generations {args.generations} is negative; give 0 or more images per prompt.")
    check_input_file(args.rid_weights, "--rid-weights")
    class_plan = ClassImagePlan.check(args.class_dir, args.num_class_images, attack)

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    generations = args.generations if args.generations is not None else (0 if args.base == "tiny" else 4)
    if generations and args.detector == "none":
        raise ConfigError("scoring generations needs a face detector; give --detector auto, or --generations 0.")
    detector = None if args.detector == "none" else load_detector(args.detector, device=args.device,
                                                                  weights_dir=args.weights_dir)
    published, held_out = clean_sets(args, cloak.resolution, detector, log)
    given = read_protected(args.protected, len(published), cloak.resolution) if args.protected else None
    recognizers = load_recognizers(resolve_names(parse_list(args.recognizers), args.weights_dir),
                                   args.weights_dir, args.device)
    denoiser = base_model_loader(args.base, attack, args.device, args.config_dir)()
    setup = EvaluationSetup(attack=attack, cloak=cloak, generations=generations)
    class_images = class_plan.prepare(denoiser, attack, log) if class_plan else None
    rows = evaluate_protection(denoiser, published, held_out, methods, recognizers, setup, given=given,
                               detector=detector, class_images=class_images, rid_weights=args.rid_weights,
                               log=log)
    summary = {"published": len(published), "held_out": len(held_out), "attack_steps": attack.ft_steps,
               "resolution": attack.resolution, "pixel_range": cloak.pixel_range,
               "generations_per_prompt": generations, "rows": [row_dict(r) for r in rows],
               "attack_learnt": attack_learnt(rows)}
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0


def clean_sets(args: argparse.Namespace, resolution: int, detector, log):
    """(published, held-out) face crops with landmarks."""
    from ..config import ConfigError
    from ..photos import load_photo_folder

    clean = load_photo_folder(args.clean, resolution, detector)
    for issue in clean.issues:
        log(f"{issue.name}: {issue.reason}")
    if args.held_out is not None:
        held_out = load_photo_folder(args.held_out, resolution, detector)
        for issue in held_out.issues:
            log(f"{issue.name}: {issue.reason}")
        return clean, held_out
    n = len(clean)
    count = args.held_out_count if args.held_out_count is not None else n // 2
    if not 1 <= count <= n - 1:
        raise ConfigError(f"--held-out-count {count} leaves no published or no held-out photo of the "
                          f"{n} usable --clean photos; choose between 1 and {n - 1}, or give --held-out DIR.")
    return clean.subset(range(n - count)), clean.subset(range(n - count, n))


def read_protected(folder: Path, expected: int, resolution: int):
    """The protected photos as they are (no cropping: they are crops already), in name order."""
    import torch

    from ..config import ConfigError
    from ..photos import list_photo_files, pil_to_tensor, read_image

    files, _ = list_photo_files(folder)
    if len(files) != expected:
        raise ConfigError(f"--protected holds {len(files)} image(s) but {expected} --clean photo(s) are "
                          "published; give the protected version of every --clean photo (same order).")
    images = []
    for number, path in enumerate(files, 1):
        image = read_image(path)
        if image.size != (resolution, resolution):
            raise ConfigError(f"protected photo {number} is {image.width}x{image.height}; the evaluation "
                              f"compares face crops at --resolution {resolution}: cloak with the same "
                              "--resolution, or set it to the protected photos' size.")
        images.append(pil_to_tensor(image))
    return torch.stack(images)


def row_dict(row) -> dict:
    from dataclasses import asdict

    data = asdict(row)
    psnr = data["change"].get("psnr")
    if psnr is not None and math.isinf(psnr):
        data["change"]["psnr"] = None  # unchanged photos: JSON has no infinity
    return data


def format_table(summary: dict) -> str:
    from ..protection_eval import LEARNT_COSINE

    rows = summary["rows"]
    names = list(rows[0]["x0_cosine"])
    generated = [r["generation"] for r in rows if r["generation"]]
    header = ["method", "budget (eta)", "PSNR", "SSIM", "s/photo", "denoise loss"] + [f"x0 {n}" for n in names]
    if generated:
        header += ["FSR"] + [f"gen {n}" for n in names]
    table = [header]
    for r in rows:
        change = r["change"]
        eta = r["eta"]
        cells = [r["method"], f"{eta * 255:.1f}/255" if eta is not None else "-",
                 _number(change.get("psnr"), ".1f", "inf" if change else "-"),
                 _number(change.get("ssim"), ".3f"), _number(r["seconds_per_photo"], ".2f"),
                 f"{r['denoise_loss']:.4f}"] + [f"{r['x0_cosine'][n]:.3f}" for n in names]
        if generated:
            g = r["generation"] or {}
            cells += [_number(g.get("fsr"), ".2f")] + [_number((g.get("cosine") or {}).get(n), ".3f") for n in names]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [f"protection against a DreamBooth-LoRA attacker ({summary['attack_steps']} steps on "
             f"{summary['published']} published photo(s), {summary['resolution']} px); its model measured on "
             f"{summary['held_out']} held-out clean photo(s) of the person"]
    lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in table]
    lines.append("budget: largest pixel change, in 255ths; PSNR/SSIM: protected vs clean photos; s/photo: the "
                 "protection's time. denoise loss: the attacker's diffusion loss on the held-out photos (lower = "
                 "it learnt the person better); x0: identity cosine of its one-step reconstruction of them "
                 "(higher = it learnt the person better)"
                 + ("; FSR / gen: faces found in, and identity cosine of, its generations" if generated else "")
                 + ". A protection works when its row stays nearer the base model than 'none' does, "
                 "and more so than 'noise' of the same budget.")
    learnt = summary["attack_learnt"]
    rises = ", ".join(f"{name} {value:+.3f}" for name, value in learnt["x0_cosine_rise"].items())
    lines.append(f"the attack on unprotected photos against the base model: denoise loss "
                 f"{-learnt['denoise_loss_drop']:+.4f}, x0 cosine {rises}")
    if not learnt["identity_learnt"]:
        lines.append("WARNING: on this model the attacker learnt no identity (x0 cosine rose less than "
                     f"{LEARNT_COSINE} under every recognizer), so these rows cannot rank protections; "
                     "measure with a real checkpoint (README: Protecting photos you publish).")
    return "\n".join(lines)


def _number(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)
