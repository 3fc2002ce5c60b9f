"""The privacy report: one self-contained HTML page (plots and images embedded as base64) plus the
PNG plots beside it, made from the JSON report that pipeline.build_report produces.

What it shows: per-iteration Stage I loss and Stage II identity score, similarity to the identity
before (X0) and after (X') per recognizer with surrogates and held-out evaluators marked, PSNR/SSIM
of X' beside the paper's Table 5, optionally a strip X0 | X' | amplified difference, the settings
with what each knob trades, and timings. It never names a photo or a path: the report dict holds
none, and nothing here adds any.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from . import atomic
from .config import KNOBS, LEGACY_PIXEL_RANGE, PAPER_PIXEL_RANGE, PIXEL_RANGES

# Paper Table 5: eta -> (PSNR dB, SSIM) of the protected photos X' against the originals.
PAPER_TABLE5: dict[float, tuple[float, float]] = {0.05: (35.1, 0.90), 0.08: (32.8, 0.84),
                                                  0.10: (31.6, 0.80), 0.15: (30.0, 0.74)}
HTML_NAME = "report.html"
PLOT_NAMES = ("plot_iterations.png", "plot_identity.png", "plot_quality.png", "plot_privacy_curve.png")
STRIP_ROWS = 4  # photos shown in the strip; enough to judge, small enough to keep the page light
ROLE_COLOURS = {"surrogate": "#c0392b", "held-out": "#2471a3"}


def check_html_output(out_dir: Path, overwrite: bool) -> None:
    """Before any work: the page and its plots can be written into out_dir, and replace files
    there only with overwrite."""
    out_dir = Path(out_dir)
    atomic.check_output_folder(out_dir, "the report page")
    for name in (HTML_NAME, *PLOT_NAMES):
        if (out_dir / name).exists():
            atomic.check_writable(out_dir / name, overwrite)


def write_report_html(report: dict[str, Any], out_dir: Path,
                      strip: tuple[Tensor, Tensor] | None = None) -> Path:
    """Writes out_dir/report.html and the PNG plots beside it (atomically); returns the HTML path.

    strip: (X0, X') as [N,3,H,W] in [0,1] to show the photos (opt-in for a user's own photos)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {name: png for name, png in zip(PLOT_NAMES, render_plots(report)) if png is not None}
    for name, png in plots.items():
        atomic.write_bytes(out_dir / name, png)
    strip_png = strip_image(*strip) if strip is not None else None
    path = out_dir / HTML_NAME
    atomic.write_text(path, render_html(report, plots, strip_png))
    return path


# --- plots --------------------------------------------------------------------------------------
def render_plots(report: dict[str, Any]) -> tuple[bytes | None, ...]:
    import matplotlib
    matplotlib.use("Agg")  # no display, no GUI toolkit: works on servers and in CI
    return (iterations_plot(report.get("iterations", [])), identity_plot(report.get("identity", [])),
            quality_plot(report), privacy_curve_plot(report))


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def iterations_plot(iterations: Sequence[dict[str, Any]]) -> bytes | None:
    """Stage I loss, Stage II score S and fine-tune loss, step by step across the iterations; a mean
    marker per iteration shows the trend the user cares about (S should fall as k grows)."""
    if not iterations:
        return None
    import matplotlib.pyplot as plt
    series = [("stage1_loss", "Stage I: L_rec (diffusion fidelity)", "#7d3c98"),
              ("stage2_score", "Stage II: identity score S (lower = more private)", "#c0392b"),
              ("ft_loss", "Fine-tune loss (both FT calls)", "#566573")]
    present = [s for s in series if any(it.get(s[0]) for it in iterations)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.2), squeeze=False)
    for ax, (key, title, colour) in zip(axes[0], present):
        x0 = 0
        for k, it in enumerate(iterations, start=1):
            values = it.get(key) or []
            xs = [x0 + i + 1 for i in range(len(values))]
            ax.plot(xs, values, color=colour, linewidth=1, alpha=0.6)
            if values:
                ax.plot([(xs[0] + xs[-1]) / 2], [sum(values) / len(values)], "o", color=colour,
                        markersize=5)
            x0 += len(values)
            if k < len(iterations):
                ax.axvline(x0 + 0.5, color="#d5d8dc", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step (grey lines: iteration boundaries; dots: iteration mean)", fontsize=7)
        ax.tick_params(labelsize=7)
    return _figure_png(fig)


def identity_plot(identity: Sequence[dict[str, Any]]) -> bytes | None:
    """Before/after bars per recognizer; colour = role (surrogate attacked vs held-out measured)."""
    if not identity:
        return None
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    control = all("control" in row for row in identity)
    fig, ax = plt.subplots(figsize=(max(5.5, 2.0 * len(identity) + 2), 3.8))
    width = 0.27 if control else 0.38
    for i, row in enumerate(identity):
        colour = ROLE_COLOURS.get(row["role"], "#7f8c8d")
        bars = [(row["before"], dict(color=colour, alpha=0.35)), (row["after"], dict(color=colour))]
        if control:
            bars.append((row["control"], dict(color="white", hatch="///")))
        offsets = [(j - (len(bars) - 1) / 2) * width for j in range(len(bars))]
        for dx, (value, style) in zip(offsets, bars):
            ax.bar(i + dx, value, width, edgecolor=colour, **style)
            ax.text(i + dx, max(value, 0) + 0.01, f"{value:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(identity)))
    ax.set_xticklabels([f"{r['recognizer']}\n({r['role']})" for r in identity], fontsize=8)
    ax.set_ylabel("cosine to the identity prototype", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylim(min(0.0, *(min(r["before"], r["after"]) - 0.05 for r in identity)), 1.12)  # room for labels
    handles = [Patch(facecolor="#999", alpha=0.35, label="before (X0)"), Patch(facecolor="#999", label="after (X')")]
    if control:
        handles.append(Patch(facecolor="white", edgecolor="#555", hatch="///",
                             label="control: the same change, shuffled"))
    handles += [Patch(facecolor=c, label=role) for role, c in ROLE_COLOURS.items()]
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    ax.set_title("Similarity to the person, before and after decoupling", fontsize=9)
    return _figure_png(fig)


def pixel_scale(config: dict[str, Any]) -> tuple[str, float]:
    """The scale eta and alpha were given in, and its factor to [0,1] units; reports written before
    the scale was recorded used [0,1]."""
    name = config.get("pixel_range", LEGACY_PIXEL_RANGE)
    return name, PIXEL_RANGES[name]


def paper_eta(config: dict[str, Any]) -> float | None:
    """This run's eta in the paper's scale ([-1,1]), where Table 5 is."""
    if config.get("eta") is None:
        return None
    return config["eta"] * pixel_scale(config)[1] / PIXEL_RANGES[PAPER_PIXEL_RANGE]


def quality_plot(report: dict[str, Any]) -> bytes | None:
    """This run's PSNR/SSIM at its eta on the paper's Table 5 curve."""
    decoupled, eta = report.get("decoupled"), paper_eta(report.get("config", {}))
    if not decoupled or eta is None:
        return None
    import matplotlib.pyplot as plt
    etas = sorted(PAPER_TABLE5)
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 2.9))
    for ax, index, key, label in ((axes[0], 0, "psnr", "PSNR (dB)"), (axes[1], 1, "ssim", "SSIM")):
        ax.plot(etas, [PAPER_TABLE5[e][index] for e in etas], "s--", color="#7f8c8d",
                label="paper, Table 5 (SD 2.1, 512 px)")
        ax.plot([eta], [decoupled[key]], "o", color="#c0392b", markersize=8, label="this run")
        ax.set_xlabel("eta (L-inf budget, [-1,1] pixel scale as in the paper)", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle("Quality of X' against X0 (higher = less visible change)", fontsize=9)
    return _figure_png(fig)


def relative_drops(report: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(recognizer, role, 1 - after/before) of this run, held-out recognizers first."""
    rows = [(r["recognizer"], r["role"], 1 - r["after"] / r["before"])
            for r in report.get("identity", []) if r.get("before")]
    return sorted(rows, key=lambda r: r[1] != "held-out")


def privacy_curve_plot(report: dict[str, Any]) -> bytes | None:
    """This run's held-out drop against its PSNR, on the curves bench_fidelity measured."""
    decoupled, drops = report.get("decoupled"), relative_drops(report)
    if not decoupled or not drops:
        return None
    import matplotlib.pyplot as plt
    from .fidelity_curve import CURVES, HELD_OUT, SETTINGS

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for (name, points), style in zip(CURVES.items(), ("o-", "s--", "^:", "v-.", "d--")):
        ax.plot([p.psnr for p in points], [100 * p.held_out_drop for p in points], style, color="#aab7b8",
                markersize=4, linewidth=1, label=name)
        for p in points:
            ax.annotate(f"{p.eta:g}", (p.psnr, 100 * p.held_out_drop), fontsize=6, color="#7f8c8d",
                        xytext=(2, 2), textcoords="offset points")
    for recognizer, role, drop in drops:
        held_out = role == "held-out"
        ax.plot([decoupled["psnr"]], [100 * drop], "o" if held_out else "x", markersize=9,
                color=ROLE_COLOURS.get(role, "#7f8c8d"), label=f"this run: {recognizer} ({role})")
    ax.set_xlabel("PSNR of X' against the photos (dB; right = less visible)", fontsize=8)
    ax.set_ylabel("drop of the cosine to the person (%)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(f"Privacy per dB. Grey: {HELD_OUT} held out, bench_fidelity\n"
                 f"({SETTINGS}; point labels: eta)", fontsize=8, loc="left")
    return _figure_png(fig)


# --- the image strip ----------------------------------------------------------------------------
def strip_image(x0: Tensor, x_prime: Tensor, rows: int = STRIP_ROWS) -> bytes:
    """PNG of rows X0 | X' | amplified difference. The difference is scaled so the largest change
    fills the grey range (mid-grey = no change), which makes the budget's pattern visible."""
    from .photos import tensor_to_pil

    x0, x_prime = x0[:rows].detach().cpu().float(), x_prime[:rows].detach().cpu().float()
    if x0.shape != x_prime.shape or x0.dim() != 4 or x0.shape[0] == 0:
        raise ValueError(f"the strip needs X0 and X' of the same shape [N,3,H,W]; got "
                         f"{tuple(x0.shape)} and {tuple(x_prime.shape)}.")
    diff = x_prime - x0
    amplified = diff / (2 * diff.abs().max().clamp_min(1e-6)) + 0.5
    rows_img = torch.cat([torch.cat([a, b, c], dim=2) for a, b, c in zip(x0, x_prime, amplified)], dim=1)
    buffer = io.BytesIO()
    tensor_to_pil(rows_img).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the page -----------------------------------------------------------------------------------
def _img(png: bytes, alt: str, css_class: str = "") -> str:
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img{cls} alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def headline(report: dict[str, Any]) -> list[str]:
    """Short sentences with the key figures (the page's summary and the demo's last lines)."""
    lines = []
    d = report.get("decoupled")
    if d:
        scale, factor = pixel_scale(report["config"])
        lines.append(f"X' vs X0: PSNR {d['psnr']:.1f} dB, SSIM {d['ssim']:.3f}, largest pixel change "
                     f"{d['linf']:.3f} of the [0,1] range (eta {report['config']['eta']:g} in the [{scale}] "
                     f"scale = {report['config']['eta'] * factor:.3f}).")
    for row in report.get("identity", []):
        change = row["after"] - row["before"]
        control = f"; the same change shuffled: {row['control']:.3f}" if "control" in row else ""
        lines.append(f"{row['recognizer']} ({row['role']}): similarity {row['before']:.3f} -> "
                     f"{row['after']:.3f} ({change:+.3f}{control}).")
    if not any(r["role"] == "held-out" for r in report.get("identity", [])):
        lines.append("No held-out recognizer was measured: the drop above is under the recognizers "
                     "that were attacked, which overstates how well the protection transfers.")
    if "seconds_total" in report:
        lines.append(f"Run time {report['seconds_total']:.1f} s.")
    return lines


def render_html(report: dict[str, Any], plots: dict[str, bytes], strip_png: bytes | None) -> str:
    config = report.get("config", {})
    photos = report.get("photos", {})
    sections = [f"<h1>IDDM privacy report</h1>"
                f"<p class='sub'>iddm {html.escape(str(report.get('iddm_version', '?')))} · "
                f"{photos.get('reference', '?')} reference photos (Xc) · "
                f"{photos.get('protection', '?')} protected photos (X0 → X')</p>",
                "<div class='box'>" + "".join(f"<p>{html.escape(s)}</p>" for s in headline(report)) + "</div>"]
    for note in report.get("notes", []):
        sections.append(f"<p class='note'>{html.escape(str(note))}</p>")

    sections.append("<h2>Identity: before and after</h2><p>Cosine similarity of the protected photos to "
                    "the person's identity prototype (the mean embedding of the reference photos), per "
                    "face recognizer. <b>Surrogates</b> were attacked in Stage II; <b>held-out</b> "
                    "evaluators were only measured, so their drop is the honest test of transfer.</p>")
    identity = report.get("identity", [])
    if identity:
        if "plot_identity.png" in plots:
            sections.append(_img(plots["plot_identity.png"], "similarity before and after per recognizer"))
        control = all("control" in r for r in identity)
        sections.append(html_table(
            ["recognizer", "role", "before (X0)", "after (X')", "change",
             *(["control: same change, shuffled"] if control else [])],
            [(r["recognizer"], r["role"], f"{r['before']:.3f}", f"{r['after']:.3f}", f"{r['after'] - r['before']:+.3f}",
              *([f"{r['control']:.3f}"] if control else [])) for r in identity],
            [r["role"].replace("-", "") for r in identity]))
        if control:
            sections.append("<p>The control adds to X0 the very same pixel changes as X' but at shuffled "
                            "positions (same largest change, same PSNR): what noise of this strength does "
                            "by itself. The protection works where X' falls well below the control.</p>")
    else:
        sections.append("<p class='note'>No recognizer measured the photos in this run.</p>")

    sections.append(_quality_section(report, plots))

    if strip_png is not None:
        sections.append("<h2>The photos</h2><p>Each row: X0 (original crop) | X' (protected) | the "
                        "difference, amplified so the largest change spans the grey range (mid-grey = "
                        "unchanged).</p>" + _img(strip_png, "original, protected and amplified difference", "strip"))
    else:
        sections.append("<h2>The photos</h2><p class='note'>Not shown: photos are included only when "
                        "asked for (the report's image strip is opt-in for your own photos).</p>")

    sections.append("<h2>Per iteration</h2><p>Stage I lowers the diffusion loss L_rec (the photos "
                    "stay learnable); Stage II lowers S, the ensemble's similarity of the model's "
                    "denoised prediction to the person (eq. 10-13).</p>")
    if "plot_iterations.png" in plots:
        sections.append(_img(plots["plot_iterations.png"], "per-iteration losses and identity score"))
    sections.append(_timing_section(report))
    sections.append("<h2>Settings and what each knob trades</h2>" + html_table(
        ["knob", "value", "what it trades"],
        [(name, _fmt(value), KNOBS[name].help if name in KNOBS else "") for name, value in config.items()]))
    return PAGE.format(title="IDDM privacy report", body="\n".join(sections))


def _quality_section(report: dict[str, Any], plots: dict[str, bytes]) -> str:
    d = report.get("decoupled")
    if not d:
        return ""
    config = report.get("config", {})
    eta, (scale, factor) = paper_eta(config), pixel_scale(config)
    rows = [(f"{e:g}", f"{p:.1f}", f"{s:.2f}", "paper, Table 5") for e, (p, s) in sorted(PAPER_TABLE5.items())]
    rows.append((f"{eta:g}", f"{d['psnr']:.1f}", f"{d['ssim']:.3f}", "this run"))
    rows.sort(key=lambda r: (float(r[0]), r[3] == "this run"))
    classes = ["this" if r[3] == "this run" else "" for r in rows]
    stage2_steps = config.get("pgd_steps", 0) - int(config.get("rho", 0) * config.get("pgd_steps", 0) + 1e-9)
    travel = config.get("iterations", 0) * stage2_steps * config.get("pgd_alpha", 0) * factor
    text = ("<h2>How visible is the change?</h2><p>PSNR and SSIM of X' against X0, beside the paper's "
            f"Table 5 (SD 2.1 at 512 px; eta in the [-1,1] pixel scale of the paper's lineage). This run's "
            f"eta {config.get('eta', 0):g} is in the [{scale}] scale: at most {config.get('eta', 0) * factor:.3f} "
            f"of the [0,1] range; no pixel moved more than {d['linf']:.3f}. "
            f"The identity steps could move a pixel up to K × Stage II steps × alpha = {travel:.2f} in "
            "total; when that is well above the budget, most pixels end at its edge and PSNR "
            "falls (fewer steps, a smaller alpha or face_mask: higher PSNR).</p>")
    plot = _img(plots["plot_quality.png"], "PSNR and SSIM against the paper") if "plot_quality.png" in plots else ""
    curve = ("<p>Where this run sits on the trade-off: the relative drop of each recognizer's cosine to "
             "the person (X' against X0) against PSNR, beside the curves benchmarks/bench_fidelity.py "
             "measured on public photos of one person with the tiny model (grey; their eta in the "
             "[-1,1] scale). A held-out recognizer's drop (circle) is the honest figure; an attacked "
             "one's (cross) measures the attack itself, not its transfer. Other photos, models and schedules move the "
             "curve: it is a guide, not a guarantee.</p>"
             + _img(plots["plot_privacy_curve.png"], "held-out drop against PSNR, this run on the measured curve")
             if "plot_privacy_curve.png" in plots else "")
    return (text + "<div class='row'>" + html_table(["eta", "PSNR (dB)", "SSIM", "source"], rows, classes)
            + plot + "</div>" + curve)


def _timing_section(report: dict[str, Any]) -> str:
    iterations = report.get("iterations", [])
    rows = [(k, f"{it.get('seconds', 0):.1f}", len(it.get("ft_loss", [])), len(it.get("stage1_loss", [])),
             len(it.get("stage2_score", []))) for k, it in enumerate(iterations, start=1)]
    total = report.get("seconds_total")
    head = f"<h2>Timings</h2><p>Total {total:.1f} s.</p>" if total is not None else "<h2>Timings</h2>"
    return head + html_table(["iteration", "seconds", "FT steps", "Stage I steps", "Stage II steps"], rows)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; max-width: 1080px;
       margin: 24px auto; padding: 0 16px; color: #1c2833; line-height: 1.45; }}
h1 {{ margin-bottom: 4px; }} h2 {{ margin-top: 28px; border-bottom: 1px solid #d5d8dc; }}
.sub {{ color: #566573; margin-top: 0; }}
.box {{ background: #f4f6f7; border-left: 4px solid #2471a3; padding: 6px 14px; }}
.box p {{ margin: 6px 0; }}
.note {{ background: #fef9e7; border-left: 4px solid #d4ac0d; padding: 6px 14px; }}
img {{ max-width: 100%; display: block; margin: 10px 0; }}
table {{ border-collapse: collapse; font-size: 14px; margin: 8px 0; }}
th, td {{ border: 1px solid #d5d8dc; padding: 4px 10px; text-align: left; vertical-align: top; }}
th {{ background: #eaeded; }}
tr.surrogate td:nth-child(2) {{ color: #c0392b; font-weight: 600; }}
tr.heldout td:nth-child(2) {{ color: #2471a3; font-weight: 600; }}
tr.this td {{ background: #fdedec; font-weight: 600; }}
.row {{ display: flex; gap: 18px; align-items: center; flex-wrap: wrap; }}
.row img {{ max-width: 640px; }}
img.strip {{ max-width: 720px; }}
</style></head>
<body>
{body}
</body></html>
"""
