"""ASPL per outer iteration on a tiny SD-shaped diffusers model: ours (comfyui_iddm.aspl) and, when
given a checkout, Anti-DreamBooth's own attacks/aspl.py, side by side in one run.

    python benchmarks/bench_cloak.py [--resolutions 128,256] [--dtypes fp32,bf16] [--iterations 4]
                                     [--threads 1] [--anti-dreambooth DIR]

One outer iteration is Anti-DreamBooth's published schedule: 3 fine-tune steps of batch 2, 6 PGD steps
on 4 photos, 3 fine-tune steps. The model is a random-weight Stable Diffusion at toy width (UNet ~1.1 M
parameters, 4-level VAE, 2-layer CLIP text encoder, byte-level tokenizer), written once as a diffusers
folder under ~/.cache/comfyui-iddm/bench; both sides load that folder. Each case runs in a fresh child
process, one after another (never two at once); the first iteration (allocations, autograd set-up) is
left out of the means. Printed: wall and CPU seconds per outer iteration and per step, and the load
average, since on a shared machine wall time is noisy and CPU seconds are the steadier figure.

Anti-DreamBooth's script (never kept in this repository) is run from the checkout given with
--anti-dreambooth, on the CPU: its source is read, its hard-coded CUDA device becomes the CPU and, for
the fp32 case, its hard-coded bf16 becomes float32 (bf16 is its own precision); the `datasets` package,
used only by its main(), is stubbed when absent. Its main()'s outer loop is repeated here around its own
functions (deep copy, train_one_epoch, pgd_attack, train_one_epoch), with its published flags
(--with_prior_preservation, --train_text_encoder, pgd_alpha 5e-3, pgd_eps 5e-2). Same work per
iteration; what differs is how: it fine-tunes the whole UNet and text encoder, we a LoRA (as its
aspl_lora.py), and README's figures say what that and the rest of the waste cost.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_photos, machine, mean, run_child  # noqa: E402
from real_size_model import DEFAULT_CACHE, SD15, ModelShape, build_networks, write_config_folder  # noqa: E402

SCRIPT = Path(__file__).resolve()
FT_STEPS, PGD_STEPS, PHOTOS, BATCH = 3, 6, 4, 2
EPS, ALPHA = 0.05, 0.005  # Anti-DreamBooth's published budget, [-1,1] pixel units
PROMPT, CLASS_PROMPT = "a photo of sks person", "a photo of person"

TINY_SD = ModelShape(
    name="sd-tiny-diffusers",
    unet=dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
              block_out_channels=(32, 32, 48, 48), cross_attention_dim=64, attention_head_dim=4,
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
             block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, scaling_factor=0.18215),
    text={**SD15.text, "vocab_size": 600, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 2, "projection_dim": 64},
)


def ensure_tiny_sd(cache: Path = DEFAULT_CACHE) -> Path:
    """The diffusers folder of TINY_SD, written on first use (renamed into place when complete)."""
    folder = Path(cache).expanduser() / TINY_SD.name
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = folder.with_name(f".{folder.name}.{os.getpid()}")
    unet, vae, text_encoder = build_networks(TINY_SD)
    write_config_folder(scratch, unet, vae, text_encoder)
    unet.save_pretrained(scratch / "unet")
    vae.save_pretrained(scratch / "vae")
    text_encoder.save_pretrained(scratch / "text_encoder")
    os.replace(scratch, folder)
    return folder


# --- the children ---------------------------------------------------------------------------------
def child_ours(args: argparse.Namespace) -> dict:
    from comfyui_iddm.aspl import PHASES, run_aspl
    from comfyui_iddm.backends.diffusers_backend import load_denoiser
    from comfyui_iddm.cloak import cloak_config
    from comfyui_iddm.photos import pil_to_tensor, read_image

    config = cloak_config(resolution=args.resolution, iterations=args.iterations, ft_steps=FT_STEPS,
                          pgd_steps=PGD_STEPS, batch_size=BATCH, eta=EPS, pgd_alpha=ALPHA,
                          mixed_precision={"fp32": "no", "bf16": "bf16"}[args.dtype])
    denoiser = load_denoiser(str(args.model), config)
    photos = torch.stack([pil_to_tensor(read_image(p)) for p in sorted(Path(args.photos).iterdir())])
    steps: dict[str, list[tuple[float, float]]] = {phase: [] for phase in PHASES}
    per_iteration: dict[int, list[float]] = {}
    last = [time.perf_counter(), time.process_time()]

    def record(event) -> None:
        now = [time.perf_counter(), time.process_time()]
        wall, cpu = now[0] - last[0], now[1] - last[1]
        last[:] = now
        if event.iteration > 1:  # the first iteration pays one-off costs
            steps[event.phase].append((wall, cpu))
        per_iteration.setdefault(event.iteration, [0.0, 0.0])
        per_iteration[event.iteration][0] += wall
        per_iteration[event.iteration][1] += cpu

    last[:] = [time.perf_counter(), time.process_time()]
    run_aspl(denoiser, photos, photos, config, on_progress=record)
    later = [v for k, v in per_iteration.items() if k > 1]
    return {"iteration_s": mean(w for w, _ in later), "iteration_cpu_s": mean(c for _, c in later),
            "ft_step_s": mean(w for phase in (PHASES[0], PHASES[2]) for w, _ in steps[phase]),
            "pgd_step_s": mean(w for w, _ in steps[PHASES[1]]), "copy_s": 0.0}


def load_anti_dreambooth(checkout: Path, dtype: str) -> types.ModuleType:
    """Its attacks/aspl.py as a module, on the CPU, in `dtype` (its own: bf16)."""
    path = Path(checkout) / "attacks" / "aspl.py"
    if not path.is_file():
        raise SystemExit(f"--anti-dreambooth {checkout}: no attacks/aspl.py there; give a checkout of "
                         "github.com/VinAIResearch/Anti-DreamBooth.")
    source = path.read_text().replace('torch.device("cuda")', 'torch.device("cpu")').replace(".cuda()", "")
    source = source.replace('.to("cuda"', '.to("cpu"')
    if dtype == "fp32":
        source = source.replace("weight_dtype = torch.bfloat16", "weight_dtype = torch.float32")
    try:
        import datasets  # noqa: F401
    except ImportError:  # only its main() uses it (log verbosity); main() is not called here
        sys.modules["datasets"] = types.SimpleNamespace(utils=None)
    module = types.ModuleType("anti_dreambooth_aspl")
    module.__file__ = str(path)
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def child_anti_dreambooth(args: argparse.Namespace) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    aspl = load_anti_dreambooth(args.anti_dreambooth, args.dtype)
    model = str(args.model)
    options = aspl.parse_args([
        "--pretrained_model_name_or_path", model, "--instance_data_dir_for_train", str(args.photos),
        "--instance_data_dir_for_adversarial", str(args.photos), "--class_data_dir", str(args.classes),
        "--instance_prompt", PROMPT, "--class_prompt", CLASS_PROMPT, "--with_prior_preservation",
        "--train_text_encoder", "--center_crop", "--resolution", str(args.resolution),
        "--max_f_train_steps", str(FT_STEPS), "--max_adv_train_steps", str(PGD_STEPS),
        "--learning_rate", "5e-7", "--pgd_alpha", str(ALPHA), "--pgd_eps", str(EPS), "--seed", "0"])
    text_encoder = aspl.import_model_class_from_model_name_or_path(model, None).from_pretrained(
        model, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer", use_fast=False)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    vae.requires_grad_(False)
    clean = aspl.load_data(options.instance_data_dir_for_train, options.resolution, options.center_crop)
    perturbed = aspl.load_data(options.instance_data_dir_for_adversarial, options.resolution, options.center_crop)
    original = perturbed.clone()
    f = [unet, text_encoder]
    times = []
    for _ in range(args.iterations):  # the body of its main()'s loop
        marks = [(time.perf_counter(), time.process_time())]
        f_sur = copy.deepcopy(f)
        marks.append((time.perf_counter(), time.process_time()))
        f_sur = aspl.train_one_epoch(options, f_sur, tokenizer, scheduler, vae, clean, FT_STEPS)
        marks.append((time.perf_counter(), time.process_time()))
        perturbed = aspl.pgd_attack(options, f_sur, tokenizer, scheduler, vae, perturbed, original, None, PGD_STEPS)
        marks.append((time.perf_counter(), time.process_time()))
        f = aspl.train_one_epoch(options, f, tokenizer, scheduler, vae, perturbed, FT_STEPS)
        marks.append((time.perf_counter(), time.process_time()))
        times.append(marks)
    later = times[1:] or times
    span = lambda marks, a, b, i=0: marks[b][i] - marks[a][i]  # noqa: E731
    return {"iteration_s": mean(span(m, 0, 4) for m in later), "iteration_cpu_s": mean(span(m, 0, 4, 1) for m in later),
            "ft_step_s": mean((span(m, 1, 2) + span(m, 3, 4)) / (2 * FT_STEPS) for m in later),
            "pgd_step_s": mean(span(m, 2, 3) / PGD_STEPS for m in later),
            "copy_s": mean(span(m, 0, 1) for m in later)}


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    figures = child_anti_dreambooth(args) if args.anti_dreambooth else child_ours(args)
    figures["load"] = round((load + os.getloadavg()[0]) / 2, 1)
    print(json.dumps(figures))


# --- the parent -------------------------------------------------------------------------------------
def prepare_photos(folder: Path, resolution: int) -> tuple[Path, Path]:
    """4 photos (the demo's sample set) and 4 class images (their mirror images) as PNG files."""
    from comfyui_iddm.photos import tensor_to_pil

    photos, classes = folder / f"photos_{resolution}", folder / f"class_{resolution}"
    if not photos.is_dir():
        _, protection = load_photos(2 * PHOTOS, resolution)
        for target, flip in ((photos, False), (classes, True)):
            target.mkdir(parents=True)
            for i, image in enumerate(protection.images[:PHOTOS]):
                tensor_to_pil(image.flip(-1) if flip else image).save(target / f"{i}.png")
    return photos, classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", default="128,256")
    parser.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16")
    parser.add_argument("--iterations", type=int, default=4, help="outer iterations per case (the first is not counted)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--anti-dreambooth", type=Path, default=None, metavar="DIR",
                        help="a checkout of github.com/VinAIResearch/Anti-DreamBooth to run beside ours")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--photos", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--classes", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    model = ensure_tiny_sd(args.cache)
    print(f"# bench_cloak: {machine()}")
    print(f"# model {model.name}; one outer iteration = {FT_STEPS} FT steps (batch {BATCH}) + {PGD_STEPS} PGD steps "
          f"on {PHOTOS} photos + {FT_STEPS} FT steps; means over iterations 2..{args.iterations}; "
          f"{args.threads} torch thread(s)")
    sides = [("ours", None)] + ([("Anti-DreamBooth", args.anti_dreambooth)] if args.anti_dreambooth else [])
    print("| px | dtype | side | s / iteration (wall) | CPU s / iteration | FT step s | PGD step s | deep copies s | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for resolution in (int(r) for r in args.resolutions.split(",")):
        photos, classes = prepare_photos(args.cache.expanduser() / "bench_cloak_photos", resolution)
        for dtype in args.dtypes.split(","):
            results = {}
            for side, checkout in sides:
                argv = ["--model", str(model), "--photos", str(photos), "--classes", str(classes),
                        "--resolution", str(resolution), "--dtype", dtype, "--iterations", str(args.iterations),
                        "--threads", str(args.threads)]
                if checkout is not None:
                    argv += ["--anti-dreambooth", str(checkout)]
                r = results[side] = run_child(SCRIPT, argv)
                print(f"| {resolution} | {dtype} | {side} | {r['iteration_s']:.2f} | {r['iteration_cpu_s']:.2f} | "
                      f"{r['ft_step_s']:.3f} | {r['pgd_step_s']:.3f} | {r['copy_s']:.3f} | {r['load']} |", flush=True)
            if len(results) == 2:
                ours, theirs = results["ours"], results["Anti-DreamBooth"]
                print(f"| {resolution} | {dtype} | ours / theirs | x{ours['iteration_s'] / theirs['iteration_s']:.2f} | "
                      f"x{ours['iteration_cpu_s'] / theirs['iteration_cpu_s']:.2f} | | | | |", flush=True)


if __name__ == "__main__":
    main()
