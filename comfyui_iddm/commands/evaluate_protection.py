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
    model_side = p.add_argument_group(
        "model-side protections (e.g. `iddm immunize`): attacked on the clean photos, beside the cloaks")
    model_side.add_argument("--protected-model", type=Path, action="append", default=[], metavar="FILE",
                            help="a protected model of --base (UNet checkpoint or LoRA); repeat for several")
    model_side.add_argument("--other-people", type=Path, default=None, metavar="DIR",
                            help="photos of other people: the protected model's denoising loss on them "
                                 "(class prompt) against the base model's")
    model_side.add_argument("--generic", type=Path, default=None, metavar="DIR",
                            help="generic images (no people needed): the same check under 'a photo'")
    model_side.add_argument("--different-person", type=Path, default=None, metavar="DIR",
                            help="photos of one other person: the same attack on them (half published, half "
                                 "held out) from the base and from the protected model")
    p.add_argument("--attacker-transform", default="none", metavar="SPEC",
                   help="what happens to every photo the attacker trains on first: 'none', or e.g. "
                        "'jpeg:75,resize:0.5' (shrunk to half the side, JPEG quality 75, scaled back up)")
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
    from ..photo_transforms import PhotoTransform
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
    transform = PhotoTransform.parse(args.attacker_transform)
    models = protected_models(args.protected_model)
    if not models and (args.other_people or args.generic or args.different_person):
        raise ConfigError("--other-people, --generic and --different-person check a protected model: give "
                          "--protected-model FILE too.")
    class_plan = ClassImagePlan.check(args.class_dir, args.num_class_images, attack)

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    generations = args.generations if args.generations is not None else (0 if args.base == "tiny" else 4)
    if generations and args.detector == "none":
        raise ConfigError("scoring generations needs a face detector; give --detector auto, or --generations 0.")
    detector = None if args.detector == "none" else load_detector(args.detector, device=args.device,
                                                                  weights_dir=args.weights_dir)
    published, held_out = clean_sets(args, cloak.resolution, detector, log)
    given = read_protected(args.protected, published, cloak.resolution) if args.protected else None
    recognizers = load_recognizers(resolve_names(parse_list(args.recognizers), args.weights_dir),
                                   args.weights_dir, args.device)
    denoiser = base_model_loader(args.base, attack, args.device, args.config_dir)()
    setup = EvaluationSetup(attack=attack, cloak=cloak, generations=generations, transform=transform)
    class_images = class_plan.prepare(denoiser, attack, log) if class_plan else None
    rows = evaluate_protection(denoiser, published, held_out, methods, recognizers, setup, given=given,
                               detector=detector, class_images=class_images, rid_weights=args.rid_weights,
                               protected_models=models, utility=utility_sets(args, cloak.resolution, detector, log),
                               log=log)
    summary = {"published": len(published), "held_out": len(held_out), "attack_steps": attack.ft_steps,
               "resolution": attack.resolution, "pixel_range": cloak.pixel_range,
               "generations_per_prompt": generations, "rows": [row_dict(r) for r in rows],
               "attack_learnt": attack_learnt(rows), "attacker_transform": transform.label}
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


def protected_models(paths: list[Path]):
    """Each --protected-model file, labelled by number and what made it (never by its name)."""
    from ..apdm_weights import load_protection
    from ..protection_eval import ProtectedModel

    models = []
    for number, path in enumerate(paths, 1):
        protection = load_protection(path)
        made = (f"APDM {protection.settings['protect_loss']}" if protection.settings else "protected model")
        models.append(ProtectedModel(f"model {number}: {made} ({protection.form})", protection))
    return models


def utility_sets(args: argparse.Namespace, resolution: int, detector, log):
    """The photos of the utility checks (None without any)."""
    from ..class_images import class_image_files, fit_class_images
    from ..config import ConfigError
    from ..photos import load_photo_folder, pil_to_tensor, read_image
    from ..protection_eval import UtilitySets

    if not (args.other_people or args.generic or args.different_person):
        return None
    import torch

    def faces(folder: Path):
        photos = load_photo_folder(folder, resolution, detector)
        for issue in photos.issues:
            log(f"{issue.name}: {issue.reason}")
        return photos

    generic = None
    if args.generic is not None:
        files = class_image_files(args.generic) if args.generic.is_dir() else []
        if not files:
            raise ConfigError(f"--generic {args.generic} holds no images; give a folder of images.")
        generic = torch.cat([fit_class_images(pil_to_tensor(read_image(f))[None], resolution) for f in files])
    different = None
    if args.different_person is not None:
        person = faces(args.different_person)
        if len(person) < 2:
            raise ConfigError(f"--different-person needs at least 2 usable photos (half published, half held "
                              f"out); {len(person)} found.")
        half = len(person) - len(person) // 2
        different = (person.subset(range(half)), person.subset(range(half, len(person))))
    return UtilitySets(other_people=faces(args.other_people).images if args.other_people else None,
                       generic=generic, different_person=different)


def read_protected(folder: Path, published, resolution: int):
    """The protected photos in name order, one per published photo: face crops at `resolution` as they
    are; whole photos (as `iddm cloak` writes them) cut at the published photo's own crop square, as
    the clean one was."""
    import torch

    from ..config import ConfigError
    from ..photos import list_photo_files, pil_to_tensor, read_image

    files, _ = list_photo_files(folder)
    if len(files) != len(published):
        raise ConfigError(f"--protected holds {len(files)} image(s) but {len(published)} --clean photo(s) are "
                          "published; give the protected version of every --clean photo (same order).")
    images = []
    for number, (path, box) in enumerate(zip(files, published.crop_boxes, strict=True), 1):
        image = read_image(path)
        if image.size != (resolution, resolution):
            if box.left + box.side > image.width + 1e-6 or box.top + box.side > image.height + 1e-6:
                raise ConfigError(f"protected photo {number} is {image.width}x{image.height}: neither a face "
                                  f"crop at --resolution {resolution} nor the whole photo of clean photo "
                                  f"{number}; cloak the --clean photos with the same --resolution.")
            image = box.cut(image, resolution)
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
    if summary["attacker_transform"] != "none":
        lines.append(f"every photo the attacker trained on went through: {summary['attacker_transform']}")
    lines += utility_lines(rows)
    return "\n".join(lines)


def utility_lines(rows: list[dict]) -> list[str]:
    """Per protected model: where the attack started, and what the model still does next to the base
    model (targets: other people's and generic images within 5%, a different person within 10%)."""
    lines = []
    for r in rows:
        u = r["utility"]
        if not u:
            continue
        lines.append(f"{r['method']}: before the attack, denoise loss {u['before_attack']['denoise_loss']:.4f} on "
                     "the held-out photos")
        for name, what in (("other_people", "other people's photos (class prompt)"),
                           ("generic", "generic images ('a photo')")):
            if name in u:
                f = u[name]
                lines.append(f"  denoise loss on {what}: base {f['base']:.4f} -> protected {f['protected']:.4f} "
                             f"({f['change']:+.1%}; target within 5%)")
        if "different_person" in u:
            f = u["different_person"]
            cosines = ", ".join(f"x0 {n} {f['base']['x0_cosine'][n]:.3f} -> {f['protected']['x0_cosine'][n]:.3f}"
                                for n in f["base"]["x0_cosine"])
            lines.append(f"  a different person, the same attack from the base -> the protected model: denoise loss "
                         f"{f['base']['denoise_loss']:.4f} -> {f['protected']['denoise_loss']:.4f} "
                         f"({f['change']:+.1%}; target within 10%), {cosines}")
    return lines


def _number(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)
