"""The rho sweep: train once per rho with everything else equal and plot the privacy-utility curve
(similarity of X' to the person under each recognizer against the PSNR of X').

Each point is a whole IDDM run (fresh LoRA, same seed, same photos), so the curve isolates rho.
"""
from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import atomic
from .config import IDDMConfig
from .photos import PhotoSet

if TYPE_CHECKING:
    from .class_images import ClassImagePlan

SWEEP_PLOT = "sweep.png"


def run_sweep(rhos: Sequence[float], out_dir: Path, config: IDDMConfig, reference: PhotoSet,
              protection: PhotoSet, *, base: str = "tiny", weights_dir: Path | None = None,
              class_plan: ClassImagePlan | None = None,
              evaluators: Sequence[str] | None = None, device: str = "cpu", config_dir: str | None = None,
              on_progress: Callable | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains one protected LoRA per rho into out_dir (lora_rho<rho>.safetensors) and writes
    sweep.json, sweep.png and sweep.html; returns the sweep summary."""
    from .backends.diffusers_backend import load_denoiser
    from .lora_io import save_lora
    from .pipeline import train_on_photos

    if not rhos:
        raise ValueError("the sweep needs at least one rho, e.g. --rho 0.1,0.3,0.5")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    points, class_images = [], None
    for rho in rhos:
        run_config = config.replace(rho=rho)
        log(f"[sweep] rho={rho:g}: {run_config.stage1_steps} Stage I + "
            f"{run_config.pgd_steps - run_config.stage1_steps} Stage II steps per iteration")
        denoiser = load_denoiser(base, run_config, device=device, config_dir=config_dir)
        if class_plan is not None and class_images is None:  # the same class images for every rho
            class_images = class_plan.prepare(denoiser, run_config, log)
        result = train_on_photos(denoiser, reference, protection, run_config, weights_dir=weights_dir,
                                 class_images=class_images, evaluators=evaluators, on_progress=on_progress)
        save_lora(out_dir / f"lora_rho{rho:g}.safetensors", result.lora, result.metadata, overwrite=True)
        points.append({"rho": rho, "decoupled": result.report["decoupled"],
                       "identity": result.report["identity"], "seconds": result.report["seconds_total"]})
        del denoiser
    sweep = {"config": {**config.to_dict(), "recognizers": result.report["config"]["recognizers"]},
             "photos": {"reference": len(reference), "protection": len(protection),
                        **({"class": len(class_images)} if class_images is not None else {})},
             "points": points}
    atomic.write_text(out_dir / "sweep.json", json.dumps(sweep, indent=2))
    write_sweep_html(sweep, out_dir)
    return sweep


def sweep_plot(sweep: dict[str, Any]) -> bytes:
    """Similarity after (y) against PSNR (x), one line per recognizer, points labelled with rho;
    the before-similarity as a dotted line of the same colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = [row["recognizer"] for row in sweep["points"][0]["identity"]] if sweep["points"] else []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(names):
        colour = colours[i % len(colours)]
        rows = [(p["decoupled"]["psnr"], next(r for r in p["identity"] if r["recognizer"] == name), p["rho"])
                for p in sweep["points"]]
        role = rows[0][1]["role"]
        ax.plot([r[0] for r in rows], [r[1]["after"] for r in rows], "o-" if role == "surrogate" else "s--",
                color=colour, label=f"{name} ({role})")
        ax.axhline(rows[0][1]["before"], color=colour, linestyle=":", linewidth=1)
        for psnr_value, row, rho in rows:
            ax.annotate(f"rho {rho:g}", (psnr_value, row["after"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set_xlabel("PSNR of X' vs X0 (dB; higher = less visible change)", fontsize=8)
    ax.set_ylabel("similarity of X' to the person (lower = more private)", fontsize=8)
    ax.set_title("Privacy-utility curve over rho (dotted: similarity before)", fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_sweep_html(sweep: dict[str, Any], out_dir: Path) -> Path:
    import base64

    from .report import PAGE, html_table

    png = sweep_plot(sweep)
    atomic.write_bytes(Path(out_dir) / SWEEP_PLOT, png)
    rows = [(f"{p['rho']:g}", f"{p['decoupled']['psnr']:.1f}", f"{p['decoupled']['ssim']:.3f}",
             *(f"{r['before']:.3f} → {r['after']:.3f}" for r in p["identity"]), f"{p['seconds']:.0f}")
            for p in sweep["points"]]
    names = [f"{r['recognizer']} ({r['role']})" for r in sweep["points"][0]["identity"]] if sweep["points"] else []
    body = ("<h1>IDDM rho sweep</h1><p class='sub'>One whole run per rho; every other setting equal: "
            + html.escape(", ".join(f"{k}={v}" for k, v in sweep["config"].items() if k != "rho")) + "</p>"
            + f'<img alt="privacy-utility curve" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            + html_table(["rho", "PSNR (dB)", "SSIM", *names, "seconds"], rows))
    path = Path(out_dir) / "sweep.html"
    atomic.write_text(path, PAGE.format(title="IDDM rho sweep", body=body))
    return path
