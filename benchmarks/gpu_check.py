"""GPU check (issue 11): IDDM at the paper's schedule on a real-size SD 1.5 (random weights), offline.

    bash benchmarks/gpu_check.sh                 # = python benchmarks/gpu_check.py --device cuda
    bash benchmarks/gpu_check.sh --cpu-smoke     # the same steps on the CPU at toy size (proves the script)

1. diffusers door, the CLI's engine path (pipeline.train_folder: photos from a folder, MTCNN crops,
   load_denoiser on the single file with its config folder, training, writing the LoRA): K=10
   iterations, T=8 PGD steps, rho 0.3, the config's default ft_steps (20), 512 px, 4 reference + 4
   protection photos (the demo's sample face). Prints seconds per identity and peak memory
   (CUDA: torch.cuda.max_memory_allocated over the whole job, weights included).
2. Half precision against float32 (comfyui_iddm.precision_check): one fine-tune step and one PGD step of
   each stage on the same weights, photo and noise; losses, gradient cosines, NaN/inf, zero gradients.
3. ComfyUI door, with $COMFYUI_PATH (and $COMFYUI_PYTHON, ComfyUI's interpreter with this pack's
   requirements): the same photos and schedule through nodes/comfy_denoiser.py on the checkpoint as
   ComfyUI's own loader reads it. Skipped with a message otherwise.
Each part runs in its own process. The model is built once into the cache (benchmarks/real_size_model.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (GIB, REPO_ROOT, ChildFailed, IDDMConfig, TrainingPeak, load_photos, machine, run_child,  # noqa: E402
                    status_mb, timed_iddm)
from real_size_model import DEFAULT_CACHE, SHAPES, ensure_model  # noqa: E402

# The paper's schedule (ft_steps: the config's default) and a toy one that proves the script on a CPU.
SCHEDULES = {"real": dict(iterations=10, pgd_steps=8, rho=0.3, resolution=512),
             "smoke": dict(iterations=1, pgd_steps=2, rho=0.5, ft_steps=1, resolution=64)}
PARTS = ("diffusers", "precision", "comfyui")
PHOTO_SIDE = 640  # the sample photos' files; every part crops the face at the schedule's resolution


def run_config(args: argparse.Namespace) -> IDDMConfig:
    knobs = {**SCHEDULES[args.size], "recognizers": ("dlib_resnet",),
             "gradient_checkpointing": args.gradient_checkpointing == "on"}
    if args.ft_steps:
        knobs["ft_steps"] = args.ft_steps
    return IDDMConfig(**knobs)


def peak_memory_gib(device: torch.device) -> float:
    """The process's peak: CUDA tensors since the last reset, or the CPU's peak resident set."""
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else status_mb("VmHWM") / 1024


def device_figures(device: torch.device) -> dict:
    """Asked in a part, never in the parent: a CUDA context there would hold memory the parts need."""
    if device.type != "cuda":
        return {"device": "cpu"}
    return {"device": torch.cuda.get_device_name(device),
            "device_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / GIB, 1),
            "reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3)}


def diffusers_door(args: argparse.Namespace) -> dict:
    """The CLI's path, as `iddm train PHOTOS --base FILE --config-dir DIR` runs it."""
    from comfyui_iddm.pipeline import FolderOutputs, train_folder

    built = ensure_model(args.cache, SHAPES[args.size])
    config = run_config(args)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as out:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = train_folder(args.photos_dir, str(built.checkpoint), FolderOutputs(Path(out) / "protected.safetensors"),
                              config, n_reference=args.photos, detector="mtcnn", device=args.device,
                              config_dir=str(built.config_dir))
        seconds = time.perf_counter() - started
    return {"config": config.to_dict(), "seconds_per_identity": round(seconds, 1),
            "training_seconds": result.report["seconds_total"], "peak_gib": round(peak_memory_gib(device), 3),
            **device_figures(device)}


def precision_agreement(args: argparse.Namespace) -> dict:
    """float32 against each half dtype the device runs, on one protection photo."""
    if importlib.util.find_spec("comfyui_iddm.precision_check") is None:
        return {"todo": "TODO(precision): comfyui_iddm.precision_check is not in this engine; wire the "
                        "fp16/bf16-vs-fp32 agreement here"}
    from comfyui_iddm.backends.diffusers_backend import load_denoiser
    from comfyui_iddm.faces.ensemble import IdentityEnsemble
    from comfyui_iddm.faces.registry import load_recognizers
    from comfyui_iddm.precision_check import compare, step_figures

    built = ensure_model(args.cache, SHAPES[args.size])
    config = run_config(args)
    device = torch.device(args.device)
    reference, protection = load_photos(2 * args.photos, config.resolution, args.photos_dir, args.photos)
    scorer = IdentityEnsemble.from_reference(load_recognizers(list(config.recognizers), None, device),
                                             reference.images.to(device), reference.landmarks.to(device), config.tau)
    half_dtypes = ["bf16"]
    if device.type == "cuda":
        half_dtypes = ["bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp16"]

    def figures(mixed_precision: str):
        denoiser = load_denoiser(str(built.checkpoint), config.replace(mixed_precision=mixed_precision),
                                 device=device, config_dir=str(built.config_dir))
        cond = denoiser.encode_prompt([config.instance_prompt])
        return step_figures(denoiser, protection.images[:1], protection.landmarks[:1], scorer, cond,
                            seed=config.seed, stage2_timesteps=config.stage2_timesteps)

    reference_figures = figures("no")
    return {"agreement": [compare(reference_figures, figures(dtype)).as_dict() for dtype in half_dtypes]}


def comfyui_door(args: argparse.Namespace) -> dict:
    """Runs under ComfyUI's interpreter: its loader, nodes/comfy_denoiser.py, the engine."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = args.device == "cpu"
    import comfy.sd

    spec = importlib.util.spec_from_file_location("comfy_denoiser", REPO_ROOT / "nodes" / "comfy_denoiser.py")
    comfy_denoiser = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(comfy_denoiser)

    built = ensure_model(args.cache, SHAPES[args.size])
    config = run_config(args)
    reference, protection = load_photos(2 * args.photos, config.resolution, args.photos_dir, args.photos)
    with torch.inference_mode():  # as ComfyUI runs its Load Checkpoint node
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(built.checkpoint))[:3]
    with comfy_denoiser.training_mode():
        denoiser = comfy_denoiser.ComfyDenoiser(
            model, clip, vae, rank=config.rank, lora_alpha=config.lora_alpha, seed=config.seed,
            mixed_precision=config.mixed_precision, gradient_checkpointing=config.gradient_checkpointing)
        peak = TrainingPeak(denoiser.device)
        try:
            timed = timed_iddm(denoiser, reference, protection, config, on_progress=peak.on_progress)
        finally:
            denoiser.release()
    return {"config": config.to_dict(), "training_seconds": round(timed.seconds, 1),
            "peak_gib": round(peak.peak / GIB, 3), "training_adds_gib": round(peak.added_gib, 3), **device_figures(denoiser.device)}


def run_part(part: str, args: argparse.Namespace, forwarded: list[str]) -> dict:
    python, cwd, extra_path = sys.executable, None, ()
    if part == "comfyui":
        root = os.environ.get("COMFYUI_PATH")
        if not root or not (Path(root) / "main.py").is_file():
            return {"skipped": "set COMFYUI_PATH to a ComfyUI checkout (and COMFYUI_PYTHON to its Python) "
                               "to run the ComfyUI door"}
        python, cwd, extra_path = os.environ.get("COMFYUI_PYTHON", sys.executable), Path(root), (root,)
    try:
        return run_child(Path(__file__), ["--part", part, *forwarded], python=python, cwd=cwd, extra_path=extra_path)
    except ChildFailed as failed:
        reason = "killed (out of memory?)" if failed.returncode == -9 else failed.stderr.strip()[-1500:]
        return {"failed": reason}


def describe(part: str, figures: dict, memory: str) -> list[str]:
    if "skipped" in figures or "todo" in figures:
        return [f"  {figures.get('skipped') or figures['todo']}"]
    if "failed" in figures:
        return [f"  FAILED: {figures['failed']}"]
    if part == "precision":
        return [f"  {json.dumps(row)}" for row in figures["agreement"]]
    lines = [f"  training: {figures['training_seconds']} s, peak {memory}: {figures['peak_gib']} GiB"
             + (f" ({figures['reserved_gib']} GiB reserved by torch's allocator)" if "reserved_gib" in figures else "")]
    if "seconds_per_identity" in figures:
        lines.insert(0, f"  seconds per identity: {figures['seconds_per_identity']} (model loading, face "
                        "detection and writing included)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--size", default="real", choices=sorted(SHAPES),
                        help="real: SD 1.5 at 512 px, the paper's schedule; smoke: toy model and schedule")
    parser.add_argument("--ft-steps", type=int, default=0, help="fine-tune steps per call (0 = the schedule's)")
    parser.add_argument("--gradient-checkpointing", default="on", choices=("on", "off"))
    parser.add_argument("--photos", type=int, default=4, help="protection photos (as many reference photos)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the model is built once")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--photos-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        part = {"diffusers": diffusers_door, "precision": precision_agreement, "comfyui": comfyui_door}[args.part]
        print(json.dumps(part(args)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a machine with an NVIDIA GPU, or use --cpu-smoke / --device cpu")
    from bench_load import write_sample_photos

    ensure_model(args.cache, SHAPES[args.size])  # once, before the parts (each loads it)
    report = {"machine": machine(), "model": SHAPES[args.size].name}
    # Written here, read by every part: ComfyUI's Python need not have the package the sample ships in.
    with tempfile.TemporaryDirectory() as photos_dir:
        write_sample_photos(Path(photos_dir), 2 * args.photos, PHOTO_SIDE)
        forwarded = ["--device", args.device, "--size", args.size, "--ft-steps", str(args.ft_steps),
                     "--gradient-checkpointing", args.gradient_checkpointing, "--photos", str(args.photos),
                     "--cache", str(args.cache), "--photos-dir", photos_dir]
        report.update({part: run_part(part, args, forwarded) for part in PARTS})
    if args.json:
        print(json.dumps(report))
        return
    memory = "VRAM (tensors)" if args.device == "cuda" else "RSS"
    print(f"GPU check on {report['machine']}; device {report['diffusers'].get('device', args.device)}; model "
          f"{report['model']} (SD 1.5 architecture, random weights, original single-file layout)")
    config = report["diffusers"].get("config")
    if config:
        print(f"schedule: K={config['iterations']}, T={config['pgd_steps']}, rho {config['rho']}, ft_steps "
              f"{config['ft_steps']}, {config['resolution']} px, {args.photos}+{args.photos} photos, mixed_precision "
              f"{config['mixed_precision']}, gradient checkpointing {args.gradient_checkpointing}")
    titles = {"diffusers": "diffusers door (the CLI's engine path)",
              "precision": "half precision vs float32 (one FT step, one Stage I and one Stage II step)",
              "comfyui": "ComfyUI door (nodes/comfy_denoiser.py on ComfyUI's loader)"}
    for part in PARTS:
        print(titles[part])
        print("\n".join(describe(part, report[part], memory)))


if __name__ == "__main__":
    main()
