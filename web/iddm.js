// IDDM web extension: a live chart on "IDDM Train" and the figures on "IDDM Identity Similarity".
// It only receives figures (the "iddm.progress" events and the nodes' ui outputs); it never asks
// the server for files. It also reads IDDM Train nodes of graphs saved with pack 0.1 by name.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { TRAIN, migrateLegacyTrainNodes } from "./legacy_graphs.js";
import { CHART_HEIGHT, TrainChart } from "./train_chart.js";
import { TEMPLATE_DESCRIPTIONS } from "./templates.js";

const SIMILARITY = "IDDMIdentitySimilarity";
const LOAD_LORA = "IDDMLoadProtectedLoRA";
const OPTIONS = "IDDMTrainOptions";
let trainInputNames = []; // IDDM Train's inputs as this server declares them

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

function restoreLegacySettings(train) {
  const { values, links } = train.properties.iddm_legacy;
  delete train.properties.iddm_legacy;
  for (const widget of train.widgets ?? []) {
    if (widget.name in values) widget.value = values[widget.name];
  }
  train.setSize([train.size[0], train.computeSize()[1]]); // its saved height was for 29 widgets
  const options = LiteGraph.createNode(OPTIONS);
  if (!options) return; // an older server without the options node: nothing to hand over
  for (const widget of options.widgets ?? []) {
    if (widget.name in values) widget.value = values[widget.name];
  }
  const graph = train.graph ?? app.graph; // the node's own graph (a subgraph's, if it is in one)
  options.pos = [train.pos[0], train.pos[1] - 40];
  graph.add(options);
  options.collapse(true); // a title bar above IDDM Train: open it to see the settings
  options.connect(0, train, train.findInputSlot("options"));
  for (const [name, [originId, originSlot]] of Object.entries(links)) {
    graph.getNodeById(originId)?.connect(originSlot, options, options.findInputSlot(name));
  }
  app.graph.setDirtyCanvas(true, true);
}

// ComfyUI's template browser describes a custom node's template by its file name a second time;
// the pack's own cards get their description instead (no other card is touched).
const CARD = "template-workflow-";
function describeTemplateCards(element) {
  const cards = element.matches?.(`[data-testid^="${CARD}"]`) ? [element]
    : element.querySelectorAll?.(`[data-testid^="${CARD}"]`) ?? [];
  for (const card of cards) {
    const description = TEMPLATE_DESCRIPTIONS[card.dataset.testid.slice(CARD.length)];
    const paragraph = card.querySelector("p");
    if (description && paragraph && paragraph.textContent !== description) {
      paragraph.textContent = description;
      paragraph.title = description;
    }
  }
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
      trainInputNames = [...Object.keys(nodeData.input?.required ?? {}), ...Object.keys(nodeData.input?.optional ?? {})];
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = created?.apply(this, arguments);
        this.iddmChart = new TrainChart(() => this.widgets?.find((w) => w.name === "iterations")?.value);
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

  // Graphs saved with pack 0.1: their IDDM Train values are read by name before the canvas would
  // place them by position (legacy_graphs.js), then set by name and the moved settings handed to an
  // IDDM Train Options node next to it, so the graph trains as it did.
  async beforeConfigureGraph(graphData) {
    if (trainInputNames.length) migrateLegacyTrainNodes(graphData, trainInputNames);
  },

  async afterConfigureGraph() {
    for (const graph of [app.graph, ...(app.graph?.subgraphs?.values() ?? [])]) {
      for (const node of [...(graph?.nodes ?? [])]) {
        if (node.type === TRAIN && node.properties?.iddm_legacy) restoreLegacySettings(node);
      }
    }
  },

  setup() {
    new MutationObserver((records) => {
      for (const record of records) record.addedNodes.forEach((node) => node.nodeType === 1 && describeTemplateCards(node));
    }).observe(document.body, { childList: true, subtree: true });
    api.addEventListener("iddm.progress", ({ detail }) => {
      const node = findNode(detail?.node);
      if (node?.iddmChart) {
        node.iddmChart.add(detail);
        node.setDirtyCanvas?.(true, false);
      }
    });
  },
});
