"""`iddm cloak PHOTOS_DIR --method aspl --base tiny --out DIR`: protect photos before posting them.

The face of each photo is found and the square crop around it at --resolution (what a personalization
trains on) is cloaked by the method (cloak.py); the change is pasted back into the whole photo
(paste_back.py), or with --crops the crops themselves are written. Into --out as cloaked_000.png, ... by
number, with nothing but the pixels (public_image.py: no metadata). Names of skipped photos are printed
on the user's own terminal only.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import atomic

FORMAT_CHOICES = ("png", "jpeg", "webp")


def add_parser(subparsers) -> None:
    from ..cli import add_knob_flags
    from ..cloak import CLOAK_DEFAULTS, CLOAK_KNOBS, METHOD_HELP, METHODS

    p = subparsers.add_parser(
        "cloak", help="protect photos you publish against someone else's personalization",
        description="Changes each photo's face crop within a small budget (eta) so that a model someone "
                    "else personalizes on the published photos learns the person badly. Methods: "
                    + "; ".join(f"{name}: {METHOD_HELP.get(name, 'see README')}" for name in METHODS)
                    + ". Measure any method with `iddm evaluate-protection`.")
    p.add_argument("photos_dir", type=Path, help="folder of the photos to protect (JPEG/PNG/WebP)")
    p.add_argument("--method", choices=list(METHODS), default="aspl", help="cloak method (default aspl)")
    p.add_argument("--base", default=None,
                   help="the diffusion model ASPL protects against: 'tiny', a diffusers model folder or a "
                        "single-file SD1.x/SD2.x checkpoint (not needed by noise, none or a trained network)")
    p.add_argument("--out", required=True, type=Path,
                   help="folder for the cloaked photos (created; must be empty unless --overwrite)")
    p.add_argument("--rid-weights", type=Path, default=None, metavar="FILE",
                   help="the trained network of --method rid (iddm rid-train, or the authors' release)")
    p.add_argument("--detector", choices=["auto", "mtcnn", "scrfd", "none"], default="auto",
                   help="face detector for the crops (none: the photos are face-centred crops already)")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="png",
                   help="png (lossless, default) or jpeg / webp at --quality: compression weakens a cloak")
    p.add_argument("--quality", type=int, default=95, help="JPEG / WebP quality 1-100 (default 95)")
    p.add_argument("--crops", action="store_true",
                   help="write the cloaked face crops (--resolution square) instead of the whole photos")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    add_model_flags(p)
    add_knob_flags(p, CLOAK_KNOBS, CLOAK_DEFAULTS, title="cloak settings (defaults: Anti-DreamBooth's ASPL)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..class_images import ClassImagePlan
    from ..cli import ProgressBar, knob_values
    from ..cloak import CLOAK_KNOBS, CloakRequest, cloak_config, make_cloak, run_cloak
    from ..config import ConfigError
    from ..paste_back import cloaked_photos, kept_share
    from ..photos import load_photo_folder
    from ..public_image import FORMATS, write_public_image

    use_threads(args.threads)
    config = cloak_config(**knob_values(args, CLOAK_KNOBS))
    if not 1 <= args.quality <= 100:
        raise ConfigError(f"--quality {args.quality} must be between 1 and 100.")
    class_plan = ClassImagePlan.check(args.class_dir, args.num_class_images, config)
    if class_plan is not None and args.method != "aspl":
        raise ConfigError(f"--class-dir feeds ASPL's fine-tunes; --method {args.method} does not fine-tune. "
                          "Drop --class-dir and --prior-weight.")
    check_output_folder(args.out, args.overwrite)
    check_input_file(args.rid_weights, "--rid-weights")
    with ProgressBar() as progress:
        photos = load_photo_folder(args.photos_dir, config.resolution, face_detector(args.detector, args.device))
        for issue in photos.issues:
            progress.write(f"{issue.name}: {issue.reason}")
        base = base_model_loader(args.base, config, args.device, args.config_dir)
        class_images = class_plan.prepare(base(), config, progress.write) if class_plan else None
        cloak = make_cloak(CloakRequest(args.method, config, denoiser=base if args.base else None,
                                        class_images=class_images, rid_weights=args.rid_weights,
                                        on_progress=progress.update))
        outcome = run_cloak(cloak, photos.images)
    args.out.mkdir(parents=True, exist_ok=True)
    written = outcome.cloaked if args.crops else cloaked_photos(args.photos_dir, photos, outcome.cloaked)
    kept = []
    for index, image in enumerate(written):
        write_public_image(args.out / f"cloaked_{index:03d}{FORMATS[args.format]}", image.permute(1, 2, 0),
                           args.format, args.quality)
        if not args.crops:
            kept.append(kept_share(image, photos.crop_boxes[index], photos.images[index], outcome.cloaked[index]))
    what = "face crops" if args.crops else "photos (the cloak pasted into each whole photo)"
    print(f"cloaked {what} written: {args.out} ({len(photos)} {args.format.upper()}, pixels only: no metadata)")
    print_figures(args.method, config, outcome)
    if kept:
        print(f"the cloak a personalization's own face crop of the written photos still holds (cosine to the "
              f"cloak's change; 1 = all): {min(kept):.3f} to {max(kept):.3f}")
    return 0


def print_figures(method: str, config, outcome) -> None:
    eta = config.budget[0]
    print(f"method {method}: budget eta {config.eta:g} in [{config.pixel_range}] pixels (largest change "
          f"{eta:.4g} of the [0,1] range, {eta * 255:.1f} of 255)")
    f = outcome.figures
    print(f"cloaked photos against the originals: largest pixel change (L-inf) {f['linf']:.4f}, "
          f"PSNR {f['psnr']:.1f} dB, SSIM {f['ssim']:.3f}")
    if "surrogate_loss_first" in f:
        print(f"surrogate model's denoising loss on the photos (ASPL raises it): "
              f"{f['surrogate_loss_first']:.4f} -> {f['surrogate_loss_last']:.4f}")
    print(f"time: {outcome.seconds:.1f} s ({outcome.seconds_per_photo:.2f} s per photo)")


# --- shared by the protection commands -------------------------------------------------------------
def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Where the base model runs and how it is found offline; the attacker's and ASPL's class images."""
    from ..cli import add_class_image_flags

    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is fastest for tiny on a busy machine)")
    p.add_argument("--config-dir", default=None,
                   help="local diffusers config folder for single-file checkpoints (offline use)")
    add_class_image_flags(p)


def use_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        from ..config import ConfigError
        if threads < 1:
            raise ConfigError(f"--threads {threads}: give 1 or more (or leave it out for torch's default).")
        torch.set_num_threads(threads)


def face_detector(name: str, device: str):
    if name == "none":
        return None
    from ..faces.detect import load_detector
    return load_detector(name, device=device)


def photos_and_model(args: argparse.Namespace, photos_dir: Path, config, class_plan, progress):
    """(face crops of the photos, the base model, its class images or None) for a command that
    fine-tunes: photo problems written to the user's terminal, missing class images generated."""
    from ..photos import load_photo_folder

    photos = load_photo_folder(photos_dir, config.resolution, face_detector(args.detector, args.device))
    for issue in photos.issues:
        progress.write(f"{issue.name}: {issue.reason}")
    denoiser = base_model_loader(args.base, config, args.device, args.config_dir)()
    class_images = class_plan.prepare(denoiser, config, progress.write) if class_plan else None
    return photos, denoiser, class_images


def base_model_loader(base: str | None, config, device: str, config_dir: str | None):
    """The base model, loaded on first call and kept (a method that needs none never loads it)."""
    from ..config import ConfigError

    loaded = []

    def load():
        if base is None:
            raise ConfigError("this needs the diffusion model: give --base (tiny, a diffusers folder or a "
                              "single-file checkpoint).")
        if not loaded:
            from ..backends.diffusers_backend import load_denoiser
            loaded.append(load_denoiser(base, config, device=device, config_dir=config_dir))
        return loaded[0]

    return load


def check_output_folder(folder: Path, overwrite: bool) -> None:
    atomic.check_output_folder(folder, "the cloaked photos")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise atomic.OutputExistsError(f"{folder} is not empty; choose an empty folder for the cloaked "
                                       "photos or allow writing into it (--overwrite).")


def check_input_file(path: Path | None, flag: str) -> None:
    if path is not None and not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{flag} {path} {what}; give the file.")
