"""`iddm`: the command-line door to the engine."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # the engine imports torch: only inside main(), where a Ctrl-C is caught
    from .config import IDDMConfig

# Sub-commands beside `train`, each a module in commands/ with add_parser(subparsers).
COMMANDS = ("demo", "report", "sweep", "similarity", "audit", "rid_train", "cloak", "attack", "evaluate_protection",
            "immunize")

# CLI flag names that differ from the shared knob names (DESIGN.md: `--alpha` is PGD's α).
FLAG_NAMES = {"pgd_alpha": "alpha"}


def add_knob_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None,
                   defaults: Mapping[str, Any] | None = None, title: str | None = None,
                   help_for: Mapping[str, str] | None = None, config_class: type | None = None,
                   knobs: Mapping[str, Any] | None = None) -> None:
    """One flag per IDDMConfig field (or per field in `names`, without IDDM's presets), help text from
    the shared KNOBS table (or `help_for`), the default shown from `defaults` or IDDMConfig's; unset
    flags stay None (knob_values). Another method's settings: its config_class and knobs table."""
    from .config import KNOBS, PRESETS, IDDMConfig

    group = parser.add_argument_group(title or "IDDM knobs (defaults: the paper's, or the preset's)")
    if names is None and config_class is None:
        group.add_argument("--preset", choices=sorted(PRESETS), default="balanced",
                           help="privacy (rho 0.1), balanced (rho 0.3, default) or likeness (rho 0.5)")
    for f in dataclasses.fields(config_class or IDDMConfig):
        if names is not None and f.name not in names:
            continue
        flag = "--" + FLAG_NAMES.get(f.name, f.name).replace("_", "-")
        kind = {"int": int, "float": float}.get(f.type, str)
        default = (defaults or {}).get(f.name, f.default)
        text = (help_for or {}).get(f.name, (knobs or KNOBS)[f.name].help)
        if f.type == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{text} (default {'on' if default else 'off'})")
        else:
            shown = default if not isinstance(default, tuple) else ",".join(map(str, default))
            group.add_argument(flag, dest=f.name, type=kind, default=None, help=f"{text} (default {shown})")


def knob_values(args: argparse.Namespace, names: Sequence[str] | None = None,
                config_class: type | None = None) -> dict[str, Any]:
    """The IDDMConfig (or config_class) knobs, or those in `names`, given on the command line (unset
    flags left out)."""
    from .config import IDDMConfig

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class or IDDMConfig)
            if getattr(args, f.name, None) is not None and (names is None or f.name in names)}


def add_class_image_flags(parser: argparse.ArgumentParser) -> None:
    """DreamBooth prior preservation's inputs (class_images.ClassImagePlan checks them)."""
    parser.add_argument("--class-dir", type=Path, default=None, metavar="DIR",
                        help="class images for DreamBooth prior preservation (needs --prior-weight > 0); "
                             "with --num-class-images, missing ones are generated into DIR once")
    parser.add_argument("--num-class-images", type=int, default=None, metavar="N",
                        help="use N class images from --class-dir, generating the missing ones with the "
                             "base model and --class-prompt (deterministic per --seed)")


def config_from_args(args: argparse.Namespace) -> IDDMConfig:
    from .config import IDDMConfig

    return IDDMConfig.preset(args.preset, **knob_values(args))


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="personalize a model on a folder of one person's photos, "
                                            "with identity decoupling", description=(
        "Runs IDDM (Algorithm 1) and writes a protected LoRA (kohya .safetensors)."))
    p.add_argument("photos_dir", type=Path, help="folder of the person's photos (JPEG/PNG/WebP)")
    p.add_argument("--base", required=True,
                   help="'tiny' (built-in test model), a diffusers model folder, or a single-file "
                        "SD1.x/SD2.x checkpoint (.safetensors)")
    p.add_argument("--out", required=True, type=Path, help="LoRA file to write (.safetensors)")
    p.add_argument("--reference", type=int, default=None,
                   help="photos in the reference set Xc (default: half); the rest are protected (X0)")
    p.add_argument("--split", choices=["order", "random", "best"], default="order",
                   help="how to pick the reference photos (best = clearest faces)")
    p.add_argument("--detector", choices=["auto", "mtcnn", "scrfd", "none"], default="auto",
                   help="face detector for cropping and landmarks (none: photos are centred face crops)")
    add_class_image_flags(p)
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="folder with face-recognizer weights (default $IDDM_WEIGHTS_DIR or the user cache)")
    p.add_argument("--evaluators", default=None,
                   help="held-out recognizers to measure (default: every present one not used in training, "
                        "arcface included)")
    p.add_argument("--decoupled-out", type=Path, default=None, help="folder to write X' (PNG per photo)")
    p.add_argument("--report", type=Path, default=None, help="JSON report to write")
    p.add_argument("--html", type=Path, default=None, metavar="DIR",
                   help="write the privacy report page (report.html + PNG plots) into DIR")
    p.add_argument("--html-photos", action="store_true",
                   help="show X0 | X' | difference in the page (your photos: off by default)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last iteration")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--config-dir", default=None,
                   help="local diffusers config folder for single-file checkpoints (offline use)")
    add_knob_flags(p)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .config import parse_list
    from .pipeline import FolderOutputs, train_folder

    config = config_from_args(args)
    outputs = FolderOutputs(args.out, args.decoupled_out, args.report, args.overwrite, args.html, args.html_photos)
    with ProgressBar() as progress, interrupt_message(outputs.state_dir):
        result = train_folder(args.photos_dir, args.base, outputs, config,
                              n_reference=args.reference, split_mode=args.split, detector=args.detector,
                              class_dir=args.class_dir, num_class_images=args.num_class_images,
                              weights_dir=args.weights_dir,
                              evaluators=parse_list(args.evaluators) if args.evaluators else None,
                              resume=args.resume, device=args.device, config_dir=args.config_dir,
                              on_progress=progress.update, on_photo_issue=progress.write)
    print_summary(result.report, args.out, written_outputs(outputs, len(result.decoupled)))
    return 0


@contextlib.contextmanager
def interrupt_message(state_dir: Path, output: str = "LoRA"):
    """Ctrl-C: say what was kept, then let main() exit with 130."""
    try:
        yield
    except KeyboardInterrupt:
        kept = state_dir.is_dir() and any(state_dir.glob("iteration-*"))
        print(f"\ninterrupted: no {output} was written; " + (
            "the finished iterations are kept: rerun the same command with --resume to continue."
            if kept else "no iteration had finished, so nothing was kept."), file=sys.stderr)
        raise


def written_outputs(outputs, n_decoupled: int) -> list[tuple[str, Path]]:
    """(what, where) for each output of a finished `iddm train` besides the LoRA."""
    from .report import HTML_NAME

    written = []
    if outputs.decoupled_dir is not None:
        written.append((f"protected photos X' ({n_decoupled} PNG)", outputs.decoupled_dir))
    if outputs.report is not None:
        written.append(("JSON report", outputs.report))
    if outputs.html_dir is not None:
        written.append(("report page", outputs.html_dir / HTML_NAME))
    return written


def print_summary(report: dict, lora_path: Path, written: Sequence[tuple[str, Path]] = ()) -> None:
    """Where each output went, then every figure with its name and unit."""
    rows = [("protected LoRA", lora_path), *written]
    width = max(len(what) for what, _ in rows)
    for what, where in rows:
        print(f"{what + ' written:':<{width + 9}} {where}")
    d, photos = report["decoupled"], report.get("photos", {})
    print(f"protected photos X' against the originals X0 (pixels in [0,1]): largest pixel change "
          f"(L-inf) {d['linf']:.3f}, PSNR {d['psnr']:.1f} dB, SSIM {d['ssim']:.3f}")
    identity = report.get("identity", [])
    if identity:
        print("similarity to the person (cosine to the identity of the reference photos; lower = harder "
              "to link), protected photos before -> after:")
        roles = {"surrogate": "surrogate: attacked in training", "held-out": "held-out: never attacked"}
        labels = [f"{row['recognizer']} ({roles.get(row['role'], row['role'])})" for row in identity]
        for label, row in zip(labels, identity):
            print(f"  {label:<{max(map(len, labels))}}  {row['before']:.3f} -> {row['after']:.3f}")
    counts = f"{photos['reference']} reference, {photos['protection']} protected; " if photos else ""
    print(f"photos: {counts}training time {report['seconds_total']:.1f} s")
    for warning in report.get("warnings", []):
        print(f"warning: {warning}")


class ProgressBar:
    """tqdm on a terminal, one line per phase change otherwise (logs stay short)."""

    def __enter__(self) -> "ProgressBar":
        from tqdm import tqdm
        self._bar = tqdm(total=0, unit="step", disable=not sys.stderr.isatty())
        self._phase = None
        return self

    def update(self, event) -> None:
        self._bar.total = event.total
        self._bar.n = event.done
        label = "S" if event.phase == "stage2" else "loss"
        self._bar.set_description(f"k={event.iteration} {event.phase}")
        self._bar.set_postfix_str(f"{label}={event.value:.4f}", refresh=True)
        if self._bar.disable and (event.iteration, event.phase) != self._phase:
            self._phase = (event.iteration, event.phase)
            print(f"[{event.done}/{event.total}] iteration {event.iteration} {event.phase}", file=sys.stderr)

    def write(self, message: str) -> None:
        self._bar.write(message, file=sys.stderr)

    def __exit__(self, *exc) -> None:
        self._bar.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iddm", description=(
        "Identity-decoupled personalization (IDDM): personalize Stable Diffusion on your photos so the "
        "portraits it generates are hard to link to you by face recognition."))
    parser.add_argument("--version", action="version", version=version_line())
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    for command in COMMANDS:
        importlib.import_module(f".commands.{command}", __package__).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:  # start-up imports torch and the engine (seconds): a Ctrl-C there is not a traceback
        from .allocator import keep_freed_memory
        from .config import ConfigError

        keep_freed_memory()  # this process exits after one job: reuse freed memory (allocator.py)
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("\ninterrupted while starting; nothing was done.", file=sys.stderr)
        return 130
    try:
        check_common_flags(args)
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        print(f"iddm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except torch_out_of_memory() as err:
        print(f"iddm {args.command}: error: out of memory ({str(err).splitlines()[0]}); use "
              "--gradient-checkpointing and --pgd-batch 1, on a GPU --mixed-precision auto (bf16 or "
              "fp16), or lower --resolution or --batch-size. README: settings per GPU memory.",
              file=sys.stderr)
        return 1


def version_line() -> str:
    """`iddm --version`: this package's version, and the Python and torch build it runs on (for bug
    reports; torch's version names its build, e.g. 2.14.1+cu130 or 2.14.1+cpu)."""
    import torch

    from . import __version__
    python = ".".join(map(str, sys.version_info[:3]))
    return f"iddm {__version__} (Python {python}, torch {torch.__version__})"


def check_common_flags(args: argparse.Namespace) -> None:
    """Flags several commands share, checked before anything is loaded: a device this machine has,
    a weights folder that exists, a photo count of at least 1 (0 must not mean the default)."""
    from .config import ConfigError
    from .devices import check_device

    if getattr(args, "device", None) is not None:
        args.device = check_device(args.device)
    weights_dir = getattr(args, "weights_dir", None)
    if weights_dir is not None and not Path(weights_dir).expanduser().is_dir():
        what = "is not a folder" if Path(weights_dir).expanduser().exists() else "does not exist"
        raise FileNotFoundError(
            f"--weights-dir {weights_dir} {what}; give the folder that holds the face-recognizer "
            "weights (README: Face-recognizer weights), or leave the flag out to use $IDDM_WEIGHTS_DIR "
            "or the user cache.")
    reference = getattr(args, "reference", None)
    if isinstance(reference, int) and not isinstance(reference, bool) and reference < 1:
        raise ConfigError(f"--reference {reference}: the reference set needs at least 1 photo; give a "
                          "count from 1 to the number of photos minus 1, or leave the flag out for half.")


def torch_out_of_memory() -> type[BaseException]:
    import torch
    return torch.OutOfMemoryError


if __name__ == "__main__":
    sys.exit(main())
