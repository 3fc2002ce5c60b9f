// Graphs saved with pack 0.1 hold every setting of IDDM Train on the node itself, as widget values
// by position. IDDM Train now keeps rho, eta, tau, K, lora_name, seed and resume; the rest moved
// to IDDM Train Options. Placed by position, the old values would land in the wrong widgets, so
// they are read by name before the canvas configures the node (nodes/spec.py has the same list).
// No imports: tests run this module with Node.js.

export const TRAIN = "IDDMTrain";
export const LEGACY_TRAIN_WIDGETS = [
  "instance_prompt", "rho", "eta", "tau", "iterations", "pgd_steps", "pgd_alpha", "ft_steps", "lr",
  "rank", "lora_alpha", "batch_size", "stage2_timesteps", "recognizers", "seed",
  "control_after_generate", "lora_name", "overwrite", "mixed_precision", "gradient_checkpointing",
  "face_detector", "class_prompt", "prior_weight", "pgd_batch", "face_mask", "target_similarity",
  "step_decay", "pixel_range", "resume",
];

// The current layout starts with rho (a number); pack 0.1's with instance_prompt (text), and it
// has far more values than the current 8.
export function isLegacyTrainNode(node) {
  const values = node?.widgets_values;
  return node?.type === TRAIN && Array.isArray(values) && values.length > 8 && typeof values[0] === "string";
}

// Rewrites the graph data in place: each old IDDM Train node loses its positional values and the
// inputs it no longer has, and keeps, in properties.iddm_legacy, its values by name and the links
// that went into its old widget inputs ({name: [origin id, origin slot]}). Returns how many nodes.
export function migrateLegacyTrainNodes(graphData, trainInputNames) {
  let migrated = 0;
  for (const graph of [graphData, ...(graphData?.definitions?.subgraphs ?? [])]) {
    for (const node of graph?.nodes ?? []) {
      if (!isLegacyTrainNode(node)) continue;
      const values = {};
      LEGACY_TRAIN_WIDGETS.forEach((name, i) => {
        if (i < node.widgets_values.length) values[name] = node.widgets_values[i];
      });
      const links = {};
      node.inputs = (node.inputs ?? []).filter((input) => {
        if (trainInputNames.includes(input.name)) return true;
        if (input.link !== null && input.link !== undefined) {
          const origin = takeLink(graph, input.link);
          if (origin) links[input.name] = origin;
        }
        return false;
      });
      node.widgets_values = [];
      node.properties = { ...(node.properties ?? {}), iddm_legacy: { values, links } };
      migrated += 1;
    }
  }
  return migrated;
}

// Removes a link from the graph data and from its origin's output; returns [origin id, slot].
function takeLink(graph, linkId) {
  const links = graph.links ?? [];
  const index = links.findIndex((l) => (Array.isArray(l) ? l[0] : l?.id) === linkId);
  if (index < 0) return null;
  const link = links[index];
  const [originId, originSlot] = Array.isArray(link) ? [link[1], link[2]] : [link.origin_id, link.origin_slot];
  links.splice(index, 1);
  const origin = (graph.nodes ?? []).find((n) => n.id === originId);
  const output = origin?.outputs?.[originSlot];
  if (output?.links) output.links = output.links.filter((id) => id !== linkId);
  return [originId, originSlot];
}
