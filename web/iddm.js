// IDDM web extension: a live chart on "IDDM Train" and the figures on "IDDM Identity Similarity".
// It only receives figures (the "iddm.progress" events and the nodes' ui outputs); it never asks
// the server for files.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN = "IDDMTrain";
const SIMILARITY = "IDDMIdentitySimilarity";
const LOAD_LORA = "IDDMLoadProtectedLoRA";
const CHART_HEIGHT = 170;
const COLORS = { stage1: "#4aa3ff", stage2: "#ff6b5a", ft: "#8f8f8f", grid: "#444", text: "#ddd" };

class TrainChart {
  constructor() {
    this.canvas = document.createElement("canvas");
    this.canvas.className = "iddm-chart";
    this.canvas.style.width = "100%";
    this.canvas.style.height = `${CHART_HEIGHT}px`;
    this.reset();
  }

  reset() {
    this.points = []; // {done, iteration, phase, value}
    this.total = 0;
    this.draw();
  }

  add(event) {
    if (event.done === 1) this.points = [];
    this.points.push(event);
    this.total = event.total;
    this.draw();
  }

  // After a reload or a cached run: rebuild from the node's ui output (per-iteration figures).
  fromReport(report) {
    this.points = [];
    let done = 0;
    (report.iterations || []).forEach((record, k) => {
      const ft = record.ft_loss || [];
      const half = Math.floor(ft.length / 2);
      const push = (phase, values) => values.forEach((value) => this.points.push({ done: ++done, iteration: k + 1, phase, value }));
      push("finetune_reference", ft.slice(0, half));
      push("stage1", record.stage1_loss || []);
      push("stage2", record.stage2_score || []);
      push("finetune_decoupled", ft.slice(half));
    });
    this.total = done;
    this.draw();
  }

  series(phases) {
    return this.points.filter((p) => phases.includes(p.phase));
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(200, canvas.clientWidth || 300);
    const height = CHART_HEIGHT;
    canvas.width = width * ratio;
    canvas.height = height * ratio;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = "#1e1e1e";
    ctx.fillRect(0, 0, width, height);
    const pad = { left: 8, right: 8, top: 22, bottom: 16 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const total = Math.max(this.total, this.points.length, 1);
    const xOf = (done) => pad.left + (plotW * (done - 0.5)) / total;

    // Iteration markers: a dashed line where each iteration starts.
    ctx.strokeStyle = COLORS.grid;
    ctx.setLineDash([3, 3]);
    ctx.fillStyle = COLORS.text;
    ctx.font = "10px sans-serif";
    let last = 0;
    for (const p of this.points) {
      if (p.iteration !== last) {
        last = p.iteration;
        const x = xOf(p.done) - plotW / total / 2;
        ctx.beginPath();
        ctx.moveTo(x, pad.top);
        ctx.lineTo(x, pad.top + plotH);
        ctx.stroke();
        ctx.fillText(`k${p.iteration}`, x + 2, pad.top + plotH + 12);
      }
    }
    ctx.setLineDash([]);

    const plot = (points, color) => {
      if (!points.length) return;
      const values = points.map((p) => p.value);
      let lo = Math.min(...values);
      let hi = Math.max(...values);
      if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
      const yOf = (v) => pad.top + plotH * (1 - (v - lo) / (hi - lo));
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      points.forEach((p, i) => {
        // A new stroke where the series pauses (e.g. between the two fine-tunes of an iteration).
        const joined = i > 0 && p.done === points[i - 1].done + 1;
        if (joined) ctx.lineTo(xOf(p.done), yOf(p.value));
        else ctx.moveTo(xOf(p.done), yOf(p.value));
      });
      ctx.stroke();
      for (const p of points) ctx.fillRect(xOf(p.done) - 1.5, yOf(p.value) - 1.5, 3, 3);
    };
    plot(this.series(["finetune_reference", "finetune_decoupled"]), COLORS.ft);
    plot(this.series(["stage1"]), COLORS.stage1);
    plot(this.series(["stage2"]), COLORS.stage2);

    // Legend with the latest value of each series.
    const latest = (phases) => {
      const s = this.series(phases);
      return s.length ? s[s.length - 1].value.toFixed(3) : "-";
    };
    ctx.font = "10px sans-serif";
    // Stage I: diffusion loss on the photos; Stage II: identity similarity S (lower = more private).
    const legend = [
      [COLORS.stage1, `Stage I ${latest(["stage1"])}`],
      [COLORS.stage2, `Stage II S ${latest(["stage2"])}`],
      [COLORS.ft, `fine-tune ${latest(["finetune_reference", "finetune_decoupled"])}`],
    ];
    let x = pad.left;
    for (const [color, label] of legend) {
      ctx.fillStyle = color;
      ctx.fillRect(x, 7, 9, 9);
      ctx.fillStyle = COLORS.text;
      ctx.fillText(label, x + 12, 15);
      x += ctx.measureText(label).width + 20;
    }
    if (!this.points.length) {
      ctx.fillStyle = COLORS.text;
      ctx.fillText("IDDM: the chart fills in while training runs", pad.left, pad.top + plotH / 2);
    }
  }
}

function addPanel(node, name, element, height) {
  const widget = node.addDOMWidget(name, name, element, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => height,
    getMaxHeight: () => height,
  });
  widget.serialize = false; // figures are not part of the workflow
  return widget;
}

function similarityText(figures) {
  const per = (figures.per_image || []).map((s) => (s === null ? "no face" : s.toFixed(2))).join("  ");
  const judge = `${figures.recognizer}${figures.held_out ? " (held out)" : ""}`;
  return `FSR ${(figures.fsr * 100).toFixed(0)}%   mean similarity ${figures.mean_similarity.toFixed(3)}\n` +
    `recognizer: ${judge}\nper image: ${per}`;
}

// Load Protected LoRA: the settings and figures stored in the LoRA (empty: not made by IDDM).
function loraText(settings) {
  if (!settings || !Object.keys(settings).length) return "not an IDDM LoRA (no IDDM settings stored)";
  const lines = [`IDDM ${settings.version}: rho ${settings.rho}  eta ${settings.eta}  K ${settings.iterations}` +
    `  T ${settings.pgd_steps}  recognizers ${[].concat(settings.recognizers).join(",")}`];
  const figures = settings.figures || {};
  if (figures.decoupled) lines.push(`photos changed: PSNR ${figures.decoupled.psnr} dB  SSIM ${figures.decoupled.ssim}`);
  for (const [role, rows] of Object.entries(figures.identity || {})) {
    for (const [name, v] of Object.entries(rows)) lines.push(`${name} (${role}): ${v.before} -> ${v.after}`);
  }
  return lines.join("\n");
}

function addTextPanel(node, name, placeholder, height) {
  const pre = document.createElement("pre");
  Object.assign(pre.style, { margin: "0", padding: "4px", fontSize: "11px", color: "#ddd",
    background: "#1e1e1e", whiteSpace: "pre-wrap", overflow: "hidden" });
  pre.textContent = placeholder;
  addPanel(node, name, pre, height);
  return pre;
}

function findNode(id) {
  if (id === null || id === undefined) return null;
  const local = String(id).split(":").pop(); // ids inside subgraphs look like "12:5"
  return app.graph?.getNodeById(Number(local)) ?? app.graph?.getNodeById(local) ?? null;
}

app.registerExtension({
  name: "iddm.privacy",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === TRAIN) {
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = created?.apply(this, arguments);
        this.iddmChart = new TrainChart();
        addPanel(this, "iddm_chart", this.iddmChart.canvas, CHART_HEIGHT);
        return result;
      };
      const executed = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        executed?.apply(this, arguments);
        const report = message?.iddm_train?.[0];
        if (report && this.iddmChart) this.iddmChart.fromReport(report);
      };
    }
    if (nodeData.name === SIMILARITY) {
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = created?.apply(this, arguments);
        this.iddmFigures = addTextPanel(this, "iddm_figures", "IDDM: similarity figures appear after a run", 64);
        return result;
      };
      const executed = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        executed?.apply(this, arguments);
        const figures = message?.iddm_similarity?.[0];
        if (figures && this.iddmFigures) this.iddmFigures.textContent = similarityText(figures);
      };
    }
    if (nodeData.name === LOAD_LORA) {
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = created?.apply(this, arguments);
        this.iddmSettings = addTextPanel(this, "iddm_settings", "IDDM: the LoRA's settings appear after a run", 80);
        return result;
      };
      const executed = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        executed?.apply(this, arguments);
        const settings = message?.iddm_lora?.[0];
        if (settings && this.iddmSettings) this.iddmSettings.textContent = loraText(settings);
      };
    }
  },

  setup() {
    api.addEventListener("iddm.progress", ({ detail }) => {
      const node = findNode(detail?.node);
      if (node?.iddmChart) {
        node.iddmChart.add(detail);
        node.setDirtyCanvas?.(true, false);
      }
    });
  },
});
