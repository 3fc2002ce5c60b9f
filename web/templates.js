// Written by tests/workflow_graphs.py: the descriptions of the pack's templates, by title (file name).
export const TEMPLATE_DESCRIPTIONS = {
  "IDDM train and generate": "Your photos → a protected LoRA → portraits, with similarity.",
  "IDDM privacy sweep over rho": "One photo set at rho 0.1, 0.3 and 0.5, side by side.",
  "IDDM generate from a protected LoRA": "Portraits from a LoRA you trained, checked against the photos.",
  "IDDM protect photos before posting": "Cloak photos so models trained on them learn you badly.",
  "IDDM anti-personalize a model": "A model that will not learn one person, even from clean photos."
};
