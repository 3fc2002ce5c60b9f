// The live chart of IDDM Train: one strip per series, each on its own scale, sharing one x axis of
// iterations (k = 1..K). Within an iteration a series' steps are spread evenly over the band, so each
// series is one line across the whole run, whatever the step counts of the phases are.
// No ComfyUI imports: it only draws on its canvas.

export const CHART_HEIGHT = 250;
const COLORS = { stage1: "#4aa3ff", stage2: "#ff6b5a", ft: "#b0b0b0", grid: "#3a3a3a", band: "#262626",
                 text: "#d8d8d8", muted: "#8c8c8c", background: "#1b1b1b" };
const FONT = "11px sans-serif";
const PAD = { left: 44, right: 8, top: 30, bottom: 18 };

// The three series: which engine phases feed each, and where a phase sits inside an iteration.
export const SERIES = [
  { key: "stage1", label: "Stage I loss L_rec", color: COLORS.stage1, phases: { stage1: [0, 1] },
    empty: "no Stage I steps (rho × T < 1)" },
  { key: "stage2", label: "Stage II score S (lower = more private)", color: COLORS.stage2,
    phases: { stage2: [0, 1] }, empty: "no Stage II steps (rho = 1 or T = 0)" },
  { key: "ft", label: "fine-tune loss", color: COLORS.ft,
    phases: { finetune_reference: [0, 0.5], finetune_decoupled: [0.5, 1] }, empty: "" },
];
const PHASE_NAMES = { finetune_reference: "fine-tune on Xc", stage1: "Stage I", stage2: "Stage II",
                      finetune_decoupled: "fine-tune on X'" };

export class TrainChart {
  static SERIES = SERIES;

  constructor(iterationsHint = () => 0) {
    this.iterationsHint = iterationsHint; // the node's K widget: the x axis before the run tells
    this.canvas = document.createElement("canvas");
    this.canvas.className = "iddm-chart";
    this.canvas.style.width = "100%";
    this.canvas.style.height = `${CHART_HEIGHT}px`;
    this.reset();
  }

  reset() {
    this.points = []; // progress events: {iteration, phase, step, steps, value, done, total}
    this.total = 0;
    this.final = null; // figures of the finished run (the node's ui output)
    this.draw();
  }

  add(event) {
    if (event.done === 1) { this.points = []; this.final = null; }
    this.points.push(event);
    this.total = event.total;
    this.draw();
  }

  // After the run, or after a reload: rebuild from the per-iteration figures of the ui output.
  fromReport(report) {
    this.points = [];
    let done = 0;
    (report.iterations || []).forEach((record, index) => {
      const ft = record.ft_loss || [];
      const half = Math.floor(ft.length / 2);
      const push = (phase, values) => values.forEach((value, i) => this.points.push(
        { iteration: index + 1, phase, step: i + 1, steps: values.length, value, done: ++done }));
      push("finetune_reference", ft.slice(0, half));
      push("stage1", record.stage1_loss || []);
      push("stage2", record.stage2_score || []);
      push("finetune_decoupled", ft.slice(half));
    });
    this.total = done;
    this.final = report;
    this.draw();
  }

  iterations() {
    const seen = this.points.reduce((k, p) => Math.max(k, p.iteration), 0);
    return Math.max(seen, this.final?.iterations?.length ?? 0, this.iterationsHint() || 0, 1);
  }

  // x of a point in iterations: its iteration's band plus its place within the phase's share.
  static x(point, series) {
    const [from, to] = series.phases[point.phase];
    return point.iteration - 1 + from + (to - from) * (point.step - 0.5) / point.steps;
  }

  seriesPoints(series) {
    return this.points.filter((p) => p.phase in series.phases);
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(240, canvas.clientWidth || 340);
    const height = CHART_HEIGHT;
    canvas.width = width * ratio;
    canvas.height = height * ratio;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = COLORS.background;
    ctx.fillRect(0, 0, width, height);
    ctx.font = FONT;
    ctx.textBaseline = "alphabetic";

    const K = this.iterations();
    const plotW = width - PAD.left - PAD.right;
    const stripH = (height - PAD.top - PAD.bottom) / SERIES.length;
    const xOf = (x) => PAD.left + (plotW * x) / K;
    this.drawHeader(ctx, width);
    this.drawIterations(ctx, K, xOf, height);
    SERIES.forEach((series, i) => this.drawStrip(ctx, series, PAD.top + i * stripH, stripH, xOf, plotW));
  }

  // Where the run is (or that it has not started), and the final figures once it has ended.
  headerLines() {
    const K = this.iterations();
    const last = this.points[this.points.length - 1];
    let status = "IDDM: the chart fills in while training runs";
    if (this.final) status = `done: ${K} iteration(s), ${this.points.length} steps` +
      (this.final.seconds_total ? ` in ${Math.round(this.final.seconds_total)} s` : "");
    else if (last) status = `iteration ${last.iteration}/${K} · ${PHASE_NAMES[last.phase] ?? last.phase} ` +
      `${last.step}/${last.steps} · ${Math.round((100 * last.done) / Math.max(last.total, 1))}%`;
    return [status, this.final ? finalFigures(this.final) : ""];
  }

  drawHeader(ctx, width) {
    const [status, summary] = this.headerLines();
    ctx.fillStyle = COLORS.text;
    fitText(ctx, status, 4, 12, width - 8);
    if (summary) {
      ctx.fillStyle = "#9fe09f";
      fitText(ctx, summary, 4, 25, width - 8);
    }
  }

  // Bands per iteration, dashed boundaries, and the iteration numbers under the strips.
  drawIterations(ctx, K, xOf, height) {
    const bottom = height - PAD.bottom;
    const every = Math.max(1, Math.ceil((18 * K) / (xOf(K) - xOf(0)))); // labels at least 18 px apart
    const current = this.final ? 0 : this.points[this.points.length - 1]?.iteration;
    for (let k = 1; k <= K; k++) {
      if (k === current) {
        ctx.fillStyle = COLORS.band;
        ctx.fillRect(xOf(k - 1), PAD.top, xOf(k) - xOf(k - 1), bottom - PAD.top);
      }
      if (k < K) {
        ctx.strokeStyle = COLORS.grid;
        ctx.setLineDash([3, 3]);
        ctx.beginPath();
        ctx.moveTo(Math.round(xOf(k)) + 0.5, PAD.top);
        ctx.lineTo(Math.round(xOf(k)) + 0.5, bottom);
        ctx.stroke();
        ctx.setLineDash([]);
      }
      if ((k - 1) % every === 0 || k === K) {
        ctx.fillStyle = COLORS.muted;
        const label = String(k);
        ctx.fillText(label, (xOf(k - 1) + xOf(k)) / 2 - ctx.measureText(label).width / 2, bottom + 13);
      }
    }
    ctx.fillStyle = COLORS.muted;
    ctx.fillText("k →", 4, bottom + 13);
  }

  drawStrip(ctx, series, top, stripH, xOf, plotW) {
    const points = this.seriesPoints(series);
    const inner = { top: top + 15, bottom: top + stripH - 4 };
    ctx.strokeStyle = COLORS.grid;
    ctx.strokeRect(PAD.left + 0.5, inner.top + 0.5, plotW - 1, inner.bottom - inner.top);
    // Label (left) and the latest value (right) above the strip.
    const latest = points.length ? format(points[points.length - 1].value) : "–";
    ctx.fillStyle = series.color;
    ctx.fillRect(PAD.left, top + 4, 8, 8);
    const valueText = `${this.final ? "last" : "now"} ${latest}`;
    const valueWidth = ctx.measureText(valueText).width;
    ctx.fillStyle = COLORS.text;
    fitText(ctx, series.label, PAD.left + 12, top + 12, plotW - valueWidth - 20);
    ctx.fillText(valueText, PAD.left + plotW - valueWidth, top + 12);
    if (!points.length) {
      ctx.fillStyle = COLORS.muted;
      const note = this.points.length ? series.empty : "";
      if (note) fitText(ctx, note, PAD.left + 6, (inner.top + inner.bottom) / 2 + 4, plotW - 12);
      return;
    }
    const values = points.map((p) => p.value);
    let lo = Math.min(...values);
    let hi = Math.max(...values);
    const spread = hi - lo || Math.max(Math.abs(hi) * 0.05, 1e-3);
    lo -= spread * 0.08;
    hi += spread * 0.08;
    const yOf = (v) => inner.bottom - ((inner.bottom - inner.top) * (v - lo)) / (hi - lo);
    // Own scale: the top and bottom values of the strip, left of it.
    ctx.fillStyle = COLORS.muted;
    for (const v of [hi, lo]) {
      const text = format(v);
      ctx.fillText(text, PAD.left - 4 - ctx.measureText(text).width, Math.min(Math.max(yOf(v) + 4, inner.top + 9), inner.bottom));
    }
    ctx.strokeStyle = series.color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    points.forEach((p, i) => {
      const x = xOf(TrainChart.x(p, series));
      if (i === 0) ctx.moveTo(x, yOf(p.value));
      else ctx.lineTo(x, yOf(p.value));
    });
    ctx.stroke();
    ctx.lineWidth = 1;
    if (points.length <= 60) {
      ctx.fillStyle = series.color;
      for (const p of points) ctx.fillRect(xOf(TrainChart.x(p, series)) - 1.5, yOf(p.value) - 1.5, 3, 3);
    }
  }
}

// "S 0.93 → 0.41 (dlib_resnet) · held-out mobilefacenet 0.92 → 0.22 · X' PSNR 36.6 dB" from the report.
export function finalFigures(report) {
  const parts = [];
  const rows = report.identity || [];
  const surrogate = rows.filter((r) => r.role === "surrogate");
  if (surrogate.length) {
    const mean = (key) => surrogate.reduce((s, r) => s + r[key], 0) / surrogate.length;
    parts.push(`similarity ${format(mean("before"))} → ${format(mean("after"))}` +
      (surrogate.length === 1 ? ` (${surrogate[0].recognizer})` : ` (${surrogate.length} surrogates)`));
  }
  for (const r of rows.filter((row) => row.role === "held-out")) {
    parts.push(`held-out ${r.recognizer} ${format(r.before)} → ${format(r.after)}`);
  }
  if (report.decoupled?.psnr !== undefined) parts.push(`X' PSNR ${report.decoupled.psnr.toFixed(1)} dB`);
  return parts.join(" · ");
}

function format(value) {
  if (!Number.isFinite(value)) return String(value);
  const magnitude = Math.abs(value);
  if (magnitude !== 0 && (magnitude < 0.001 || magnitude >= 10000)) return value.toExponential(1);
  return value.toPrecision(3).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
}

// Text cut with an ellipsis to fit `width` pixels.
function fitText(ctx, text, x, y, width) {
  let shown = text;
  while (shown.length > 1 && ctx.measureText(shown).width > width) shown = shown.slice(0, -2) + "…";
  ctx.fillText(shown, x, y);
}
