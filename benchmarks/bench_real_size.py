"""Real size (issue 11, memory that fits consumer cards): one short IDDM iteration on a random-weight
Stable Diffusion 1.5 of the real architecture, at 512 px, with 4 protection + 4 reference photos.

    python benchmarks/bench_real_size.py [--quick | --case DTYPE,PGD_BATCH,CKPT ...] [--json]
                                         [--device cpu|cuda] [--cache DIR] [--threads N] [--memory-limit GIB]

The model (benchmarks/real_size_model.py: original single-file layout, fp16, built once into the
cache) loads through load_denoiser with a local config folder, the path a user's sd15.safetensors
takes. Cases: compute dtype (fp32 = mixed_precision "no", bf16) x pgd_batch (1, 4) x gradient
checkpointing (on, off); --quick runs only the default (bf16, pgd_batch 1, checkpointing on). Each
case runs in a fresh child process and reports seconds per fine-tune / Stage I / Stage II step and:
  weights_gib        the loaded model's parameters and buffers (UNet with LoRA, VAE, text encoder)
  training_adds_gib  peak memory from right after loading (model, photos, recognizer) to the last
                     training step, minus the use at that point. CPU: the kernel's high-water mark
                     of the resident set (reset through /proc/self/clear_refs); CUDA:
                     torch.cuda.max_memory_allocated (tensors only).
A case that runs out of memory is reported as such. Figures only, never asserted; the target for
the default case is training_adds_gib <= 5.5.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (GIB, ChildFailed, IDDMConfig, TrainingPeak, load_photos, machine, mean, run_child,  # noqa: E402
                    timed_iddm)
from real_size_model import DEFAULT_CACHE, ensure_model  # noqa: E402

# One iteration: 2 + 2 fine-tune steps (batch 2), 1 Stage I + 1 Stage II step on the 4 protection photos.
SCHEDULE = dict(iterations=1, ft_steps=2, pgd_steps=2, rho=0.5, recognizers=("dlib_resnet",), seed=0)
TARGET_TRAINING_ADDS_GIB = 5.5


@dataclass(frozen=True)
class Case:
    dtype: str  # the mixed_precision knob: "no" (fp32) or "bf16"
    pgd_batch: int
    gradient_checkpointing: bool

    def config(self, resolution: int) -> IDDMConfig:
        return IDDMConfig(**SCHEDULE, resolution=resolution, mixed_precision=self.dtype,
                          gradient_checkpointing=self.gradient_checkpointing, pgd_batch=self.pgd_batch)

    @classmethod
    def parse(cls, text: str) -> "Case":
        """'fp32,1,on' -> Case("no", 1, True)."""
        dtype, batch, checkpointing = text.split(",")
        if dtype not in ("fp32", "bf16") or checkpointing not in ("on", "off"):
            raise argparse.ArgumentTypeError(f"{text!r} is not DTYPE,PGD_BATCH,CHECKPOINTING like 'fp32,1,on'")
        return cls("no" if dtype == "fp32" else dtype, int(batch), checkpointing == "on")

    @property
    def dtype_name(self) -> str:
        return "fp32" if self.dtype == "no" else self.dtype

    def text(self) -> str:
        return f"{self.dtype_name},{self.pgd_batch},{'on' if self.gradient_checkpointing else 'off'}"

    def figures(self) -> dict:
        return {"dtype": self.dtype_name, "pgd_batch": self.pgd_batch,
                "gradient_checkpointing": self.gradient_checkpointing}


DEFAULT_CASE = Case("bf16", 1, True)  # the default for CPU and CUDA alike


def all_cases() -> list[Case]:
    return [Case(dtype, batch, checkpointing) for dtype in ("bf16", "no") for batch in (1, 4)
            for checkpointing in (True, False)]


def weights_gib(denoiser) -> float:
    modules = (denoiser.unet, denoiser.codec.vae, denoiser.prompt_encoder.text_encoder)
    tensors = {t.data_ptr(): t.nbytes for m in modules for t in (*m.parameters(), *m.buffers())}
    return sum(tensors.values()) / GIB


def step_seconds(phase_seconds: dict, ft_steps: int) -> dict:
    """Mean seconds per step. The first step of each fine-tune call also encodes its photos (and
    the prompt), so it is reported apart."""
    ft = phase_seconds["finetune"]
    later = [s for i, s in enumerate(ft) if i % ft_steps]
    return {"ft": round(mean(later or ft), 2), "ft_first_with_encoding": round(mean(ft[::ft_steps]), 2),
            "stage1": round(mean(phase_seconds["stage1"]), 2), "stage2": round(mean(phase_seconds["stage2"]), 2)}


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text \
        or "out of memory" in text


def child(args: argparse.Namespace) -> dict:
    from comfyui_iddm.backends.diffusers_backend import load_denoiser
    from comfyui_iddm.faces.registry import load_recognizers

    torch.set_num_threads(args.threads)
    if args.memory_limit and args.device == "cpu":  # an allocation error instead of the system's OOM killer
        limit = int(args.memory_limit * GIB)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    (case,) = args.case
    config = case.config(args.resolution)
    figures = {**case.figures(), "config": config.to_dict()}
    try:
        built = ensure_model(args.cache)
        denoiser = load_denoiser(str(built.checkpoint), config, device=args.device,
                                 config_dir=str(built.config_dir))
        reference, protection = load_photos(2 * args.photos, args.resolution, reference=args.photos)
        recognizers = load_recognizers(list(config.recognizers), None, denoiser.device)  # imports paged in
        figures.update(weights_gib=round(weights_gib(denoiser), 3),
                       unet_weights_dtype=str(next(denoiser.unet.parameters()).dtype).removeprefix("torch."),
                       compute_dtype=str(getattr(denoiser, "compute_dtype", "not reported")).removeprefix("torch."))
        peak = TrainingPeak(denoiser.device)
        timed = timed_iddm(denoiser, reference, protection, config, on_progress=peak.on_progress)
        del recognizers
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        return {**figures, "out_of_memory": str(error).strip().splitlines()[0][:300]}
    return {**figures, "training_adds_gib": round(peak.added_gib, 3), "peak_gib": round(peak.peak / GIB, 3),
            "phase_adds_gib": peak.phase_added_gib(),
            "seconds": step_seconds(timed.phase_seconds, config.ft_steps),
            "cpu_seconds": step_seconds(timed.phase_cpu_seconds, config.ft_steps), "seconds_total": round(timed.seconds, 1),
            "cpu_seconds_total": round(timed.cpu_seconds, 1)}


def run_case(case: Case, args: argparse.Namespace) -> dict:
    argv = ["--case", case.text(), "--device", args.device, "--cache", str(args.cache), "--threads", str(args.threads),
            "--resolution", str(args.resolution), "--photos", str(args.photos),
            "--memory-limit", str(args.memory_limit)]
    try:
        return run_child(Path(__file__), argv)
    except ChildFailed as failed:
        if failed.returncode == -9:
            return {**case.figures(), "out_of_memory": "killed by the system (SIGKILL: out of memory)"}
        last_line = failed.stderr.strip().splitlines()[-1] if failed.stderr.strip() else ""
        return {**case.figures(), "error": f"exit code {failed.returncode}: {last_line[:300]}"}


def default_memory_limit() -> float:
    """What is free now, less 1 GiB for everything else on the machine (0 = no limit, off Linux)."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return 0.0
    available_kib = next(int(line.split()[1]) for line in meminfo.read_text().splitlines()
                         if line.startswith("MemAvailable:"))
    return round(available_kib / 2 ** 20 - 1, 1)


def print_table(report: dict) -> None:
    print(f"machine: {report['machine']}, torch threads {report['threads']}, device {report['device']}"
          + (f", memory limit per case {report['memory_limit_gib']} GiB" if report["memory_limit_gib"] else ""))
    print(f"IDDMConfig of the cases (dtype, pgd_batch, gradient_checkpointing vary): {report['config']}")
    print("seconds per step: wall (CPU, all threads)")
    print(f"{'dtype':6}{'pgd_batch':>10}{'ckpt':>6}{'weights GiB':>13}{'training adds GiB':>19}"
          f"{'FT step':>15}{'Stage I step':>15}{'Stage II step':>15}{'total s':>9}  computes in")
    for c in report["cases"]:
        head = f"{c['dtype']:6}{c['pgd_batch']:>10}{'on' if c['gradient_checkpointing'] else 'off':>6}"
        if "seconds" not in c:
            print(f"{head}  {c.get('out_of_memory') and 'OUT OF MEMORY: ' + c['out_of_memory'] or c.get('error')}")
            continue
        steps = "".join(f"{c['seconds'][p]:>8.1f} ({c['cpu_seconds'][p]:>4.0f})" for p in ("ft", "stage1", "stage2"))
        print(f"{head}{c['weights_gib']:>13.2f}{c['training_adds_gib']:>19.2f}{steps}{c['seconds_total']:>9.0f}"
              f"  {c['compute_dtype']} (UNet weights {c['unet_weights_dtype']})")
    print("what training adds, by phase (GiB; the first fine-tune step also encodes the reference photos):")
    for c in report["cases"]:
        if "phase_adds_gib" in c:
            print(f"  {c['dtype']},{c['pgd_batch']},{'on' if c['gradient_checkpointing'] else 'off'}: "
                  + ", ".join(f"{phase} {gib:.2f}" for phase, gib in c["phase_adds_gib"].items()))
    default = next((c for c in report["cases"] if "training_adds_gib" in c and c["dtype"] == "bf16"
                    and c["pgd_batch"] == 1 and c["gradient_checkpointing"]), None)
    if default is not None:
        print(f"default case: training adds {default['training_adds_gib']:.2f} GiB "
              f"(target <= {TARGET_TRAINING_ADDS_GIB}); the first fine-tune step of each call, which also "
              f"encodes its photos: {default['seconds']['ft_first_with_encoding']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the default case (bf16, pgd_batch 1, checkpointing)")
    parser.add_argument("--case", action="append", type=Case.parse, metavar="DTYPE,PGD_BATCH,CKPT",
                        help="run only this case, e.g. fp32,4,off (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the model is built once")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-limit", type=float, default=None,
                        help="CPU: GiB a case may allocate before it counts as out of memory "
                             "(default: available memory at start less 1 GiB; 0 = no limit)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--photos", type=int, default=4, help="protection photos (as many reference photos)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.memory_limit is None:
        args.memory_limit = default_memory_limit()
    # Built in its own process: the build's freed memory must not sit in a case's baseline.
    subprocess.run([sys.executable, str(Path(__file__).with_name("real_size_model.py")), "--cache", str(args.cache)],
                   check=True, stdout=subprocess.DEVNULL)
    report = {"machine": machine(), "threads": args.threads, "device": args.device,
              "memory_limit_gib": args.memory_limit if args.device == "cpu" else None,
              "config": DEFAULT_CASE.config(args.resolution).to_dict(),
              "photos": {"reference": args.photos, "protection": args.photos},
              "cases": [run_case(case, args) for case in ([DEFAULT_CASE] if args.quick else args.case or all_cases())]}
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
