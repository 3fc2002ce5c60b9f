"""The shipped example workflows: their graphs, the UI-format rendering, and a validator.

The three graphs are written once here in API format (what POST /prompt takes). The UI format
(what the ComfyUI canvas loads) is derived from them with the nodes' declarations, so the two
files of each workflow always describe the same graph. `python tests/workflow_graphs.py` rewrites
workflows/*.json and workflows/api/*.json; tests/test_workflows.py checks the files are current and
valid against the IDDM node specs (nodes/spec.py) and the stock nodes' interfaces
(tests/data/comfyui_stock_nodes.json, read from a real ComfyUI).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pack_nodes

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
STOCK_NODES = Path(__file__).with_name("data") / "comfyui_stock_nodes.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # any SD 1.x / 2.x checkpoint of the user's
PHOTO_FOLDER = "my_photos"  # a folder of the person's photos inside the private-photos root
CLASS_FOLDER = "other_people"  # beside it: photos of other people (APDM's class images)
POSITIVE = "a photo of sks person, portrait, natural light"
NEGATIVE = "blurry, lowres, deformed"
CONNECTED_LORA = pack_nodes.load("spec").CONNECTED_LORA  # Load Protected LoRA: use the 'lora' input


# ----------------------------------------------------------------------------- node interfaces

def node_definitions() -> dict[str, dict[str, Any]]:
    """class_type -> {"inputs": {name: {...}}, "outputs": [types], "output_names": [...]}."""
    spec = pack_nodes.load("spec")
    defs = {k: v for k, v in json.loads(STOCK_NODES.read_text()).items() if not k.startswith("_")}
    for node in spec.ALL_NODES:
        # ComfyUI orders inputs required first, then optional; widgets follow that order.
        ordered = [p for p in node.inputs if not p.optional] + [p for p in node.inputs if p.optional]
        defs[node.node_id] = {
            # A list found at load time (files) cannot be checked without ComfyUI: any value passes.
            "inputs": {p.name: {"type": p.type, "options": [] if p.options_from else list(p.options),
                                "default": p.default,
                                "min": p.min, "max": p.max, "control_after_generate": p.seed,
                                "optional": p.optional} for p in ordered},
            "outputs": [p.type for p in node.outputs],
            "output_names": [p.name for p in node.outputs],
        }
    return defs


def widget_defaults(class_type: str, defs: dict) -> dict[str, Any]:
    return {name: d["default"] for name, d in defs[class_type]["inputs"].items()
            if d["type"] in WIDGET_TYPES and d.get("default") is not None}


# ----------------------------------------------------------------------------- the graphs

def _node(class_type: str, title: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}


def _train(defs, model_from: str, photos_from: str, options_from: str, rho: float, title: str) -> dict:
    knobs = widget_defaults("IDDMTrain", defs)
    knobs.update(rho=rho, lora_name="")  # empty: a neutral name is chosen at run time
    return _node("IDDMTrain", title, model=[model_from, 0], clip=[model_from, 1], vae=[model_from, 2],
                 reference=[photos_from, 0], protection=[photos_from, 1], options=[options_from, 0], **knobs)


def _options(defs, title: str = "IDDM Train Options") -> dict:
    return _node("IDDMTrainOptions", title, **widget_defaults("IDDMTrainOptions", defs))


def _generate(graph: dict, first_id: int, defs, lora_from: list | None, lora_file: str, reference_from: str,
              label: str, checkpoint_id: str = "1", negative_id: str = "3", latent_id: str = "4") -> None:
    """Load Protected LoRA -> prompt -> KSampler -> VAE Decode -> Identity Similarity -> outputs."""
    ids = [str(first_id + i) for i in range(7)]
    load, positive, sampler, decode, similarity, preview, save = ids
    lora_inputs = {"lora": lora_from} if lora_from else {}
    graph[load] = _node("IDDMLoadProtectedLoRA", f"Load Protected LoRA {label}".strip(),
                        model=[checkpoint_id, 0], clip=[checkpoint_id, 1], lora_name=lora_file,
                        strength_model=1.0, strength_clip=1.0, **lora_inputs)
    graph[positive] = _node("CLIPTextEncode", f"Prompt {label}".strip(), text=POSITIVE, clip=[load, 1])
    graph[sampler] = _node("KSampler", f"KSampler {label}".strip(), model=[load, 0], seed=0, steps=30,
                           cfg=7.0, sampler_name="euler", scheduler="normal", positive=[positive, 0],
                           negative=[negative_id, 0], latent_image=[latent_id, 0], denoise=1.0)
    graph[decode] = _node("VAEDecode", f"VAE Decode {label}".strip(), samples=[sampler, 0],
                          vae=[checkpoint_id, 2])
    sim_inputs = {"lora": lora_from} if lora_from else {}
    graph[similarity] = _node("IDDMIdentitySimilarity", f"Identity Similarity {label}".strip(),
                              generated=[decode, 0], reference=[reference_from, 0], recognizer="auto",
                              **sim_inputs)
    # For looking: the annotated grid in a stock Preview (a temp file, nothing kept). For publishing:
    # Save Public Image, which writes no prompt, workflow or LoRA name into the files.
    graph[preview] = _node("PreviewImage", f"Portraits with similarity {label}".strip(),
                           images=[similarity, 3])
    graph[save] = _node("IDDMSavePublicImage", f"Save Public Image {label}".strip(), images=[decode, 0],
                        filename_prefix="portrait", format="png", quality=95)


def _common(defs, checkpoint: str, folder: str) -> dict:
    return {
        "1": _node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=checkpoint),
        "2": _node("IDDMLoadPrivatePhotos", "Load Private Photos", folder=folder,
                   **{k: v for k, v in widget_defaults("IDDMLoadPrivatePhotos", defs).items() if k != "folder"}),
        "3": _node("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=["1", 1]),
        "4": _node("EmptyLatentImage", "Empty Latent", width=512, height=512, batch_size=4),
        "5": _node("IDDMSplitReferenceProtection", "Split Reference / Protection", photos=["2", 0],
                   **widget_defaults("IDDMSplitReferenceProtection", defs)),
    }


def train_and_generate(defs) -> dict:
    graph = _common(defs, CHECKPOINT, PHOTO_FOLDER)
    graph["9"] = _options(defs)
    graph["6"] = _train(defs, "1", "5", "9", 0.3, "IDDM Train")
    _generate(graph, 10, defs, ["6", 0], CONNECTED_LORA, "5", "")
    return graph


def privacy_sweep(defs) -> dict:
    graph = _common(defs, CHECKPOINT, PHOTO_FOLDER)
    graph["9"] = _options(defs, "IDDM Train Options (shared: only rho differs)")
    for lane, (rho, preset) in enumerate(((0.1, "privacy"), (0.3, "balanced"), (0.5, "likeness"))):
        train_id = str(6 + lane)
        label = f"rho {rho}"
        graph[train_id] = _train(defs, "1", "5", "9", rho, f"IDDM Train {label} ({preset})")
        _generate(graph, 10 + 10 * lane, defs, [train_id, 0], CONNECTED_LORA, "5", f"({label})")
    return graph


def generate_only(defs) -> dict:
    graph = _common(defs, CHECKPOINT, PHOTO_FOLDER)
    del graph["5"]  # the reference photos go straight to Identity Similarity
    # The user picks their own LoRA; the example name has IDDM Train's neutral default shape.
    _generate(graph, 10, defs, None, "iddm_20260101_a1b2c3.safetensors", "2", "")
    return graph


def protect_before_posting(defs) -> dict:
    """Photos someone else might personalize a model on: cloaked against the model, saved with no metadata."""
    return {
        "1": _node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=CHECKPOINT),
        "2": _node("IDDMLoadPrivatePhotos", "Load the photos to post", folder=PHOTO_FOLDER,
                   **{k: v for k, v in widget_defaults("IDDMLoadPrivatePhotos", defs).items() if k != "folder"}),
        "3": _node("IDDMCloakPhotos", "IDDM Cloak Photos", images=["2", 0], model=["1", 0], clip=["1", 1],
                   vae=["1", 2], **widget_defaults("IDDMCloakPhotos", defs)),
        "4": _node("IDDMSavePublicImage", "Save Public Image (pixels only)", images=["3", 0],
                   filename_prefix="cloaked", format="png", quality=95),
    }


def anti_personalize_model(defs) -> dict:
    """A model that will not learn one person (APDM): protected against their photos, keeping everyone
    else (class images), then asked for the person."""
    photos = {k: v for k, v in widget_defaults("IDDMLoadPrivatePhotos", defs).items() if k != "folder"}
    return {
        "1": _node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=CHECKPOINT),
        "2": _node("IDDMLoadPrivatePhotos", "Load the person's photos", folder=PHOTO_FOLDER, **photos),
        "3": _node("IDDMLoadPrivatePhotos", "Load photos of other people (class images)", folder=CLASS_FOLDER,
                   **photos),
        "4": _node("IDDMAntiPersonalizeModel", "IDDM Anti-Personalize Model", model=["1", 0], clip=["1", 1],
                   vae=["1", 2], subject=["2", 0], class_images=["3", 0],
                   **widget_defaults("IDDMAntiPersonalizeModel", defs)),
        "5": _node("CLIPTextEncode", "Prompt for the person", text=POSITIVE, clip=["1", 1]),
        "6": _node("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=["1", 1]),
        "7": _node("EmptyLatentImage", "Empty Latent", width=512, height=512, batch_size=4),
        "8": _node("KSampler", "KSampler (the protected model)", model=["4", 0], positive=["5", 0],
                   negative=["6", 0], latent_image=["7", 0], seed=0, steps=30,
                   cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0),
        "9": _node("VAEDecode", "VAE Decode", samples=["8", 0], vae=["1", 2]),
        "10": _node("PreviewImage", "What the protected model draws", images=["9", 0]),
    }


GRAPHS = {"iddm_train_and_generate": train_and_generate, "iddm_privacy_sweep": privacy_sweep,
          "iddm_generate_from_protected_lora": generate_only,
          "iddm_protect_photos_before_posting": protect_before_posting,
          "iddm_anti_personalize_model": anti_personalize_model}


@dataclass(frozen=True)
class Template:
    """How ComfyUI's template browser shows a UI-format workflow. Its frontend (1.27 of ComfyUI
    0.3.64, and later ones) reads nothing but the file name of a custom node's template: the name is
    the title, the name again (- and _ as spaces) the description, and <name>.jpg the thumbnail.
    So the UI file is named by its title; web/templates.js puts the description on the card."""
    title: str
    description: str
    shows: tuple[str, ...]  # the nodes the thumbnail is cropped around


TEMPLATES = {
    "iddm_train_and_generate": Template(
        "IDDM train and generate", "Your photos → a protected LoRA → portraits, with similarity.",
        ("5", "9", "6", "10")),
    "iddm_privacy_sweep": Template(
        "IDDM privacy sweep over rho", "One photo set at rho 0.1, 0.3 and 0.5, side by side.",
        ("6", "7", "10", "20")),
    "iddm_generate_from_protected_lora": Template(
        "IDDM generate from a protected LoRA", "Portraits from a LoRA you trained, checked against the photos.",
        ("10", "11", "12")),
    "iddm_protect_photos_before_posting": Template(
        "IDDM protect photos before posting", "Cloak photos so models trained on them learn you badly.",
        ("2", "3", "4")),
    "iddm_anti_personalize_model": Template(
        "IDDM anti-personalize a model", "A model that will not learn one person, even from clean photos.",
        ("2", "3", "4")),
}


def ui_path(name: str) -> Path:
    """The UI-format file of a graph (the API one is workflows/api/<name>.json)."""
    return WORKFLOWS / f"{TEMPLATES[name].title}.json"


# ----------------------------------------------------------------------------- UI format

def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


COLUMN_WIDTH, NODE_WIDTH, GAP, LANE_GAP, TOP = 380, 340, 50, 150, 40
GROUP_TITLE = 100  # a lane's group title sits above the badges ComfyUI draws over node titles


def to_ui(api: dict, defs: dict) -> dict:
    """API graph -> litegraph workflow (what the canvas loads), laid out to read left to right."""
    layout = _layout(api, defs)
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for node_id in sorted(api, key=int):
        for value in api[node_id]["inputs"].values():
            if _is_link(value):
                links.append([len(links) + 1, int(value[0]), value[1], int(node_id), None, None])
                out_links.setdefault((value[0], value[1]), []).append(len(links))
    for order, node_id in enumerate(sorted(api, key=lambda n: (layout.column[n], int(n)))):
        node = api[node_id]
        d = defs[node["class_type"]]
        inputs, widgets = [], []
        for name, spec in d["inputs"].items():
            value = node["inputs"].get(name)
            if spec["type"] in WIDGET_TYPES:
                widgets.append(value if value is not None else spec.get("default"))
                if spec.get("control_after_generate"):
                    widgets.append("fixed")
                continue
            link_id = None
            if _is_link(value):
                link_id = next(l[0] for l in links if l[3] == int(node_id) and l[4] is None
                               and l[1] == int(value[0]) and l[2] == value[1])
                links[link_id - 1][4] = len(inputs)
                links[link_id - 1][5] = spec["type"]
            inputs.append({"name": name, "type": spec["type"], "link": link_id})
        outputs = [{"name": n, "type": t, "links": out_links.get((node_id, slot), []), "slot_index": slot}
                   for slot, (t, n) in enumerate(zip(d["outputs"], d["output_names"]))]
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": list(layout.pos[node_id]),
                      "size": [NODE_WIDTH, layout.height[node_id]], "flags": {}, "order": order, "mode": 0,
                      "inputs": inputs, "outputs": outputs, "title": node["_meta"]["title"],
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    nodes.sort(key=lambda n: n["id"])
    return {"last_node_id": max(int(n) for n in api), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": layout.groups, "config": {}, "extra": {}, "version": 0.4}


class _Layout:
    """Columns by depth (a node right of everything it reads). Each IDDM Train starts a lane: the
    nodes that depend on it alone sit in one row band, so a lane reads left to right and lanes stack
    (one per rho in the sweep); everything else is shared and stacks in the columns on the left."""

    def __init__(self, api: dict, defs: dict) -> None:
        self.api = api
        sources = {n: [v[0] for v in node["inputs"].values() if _is_link(v)] for n, node in api.items()}
        consumers = {n: [m for m in api if n in sources[m]] for n in api}
        trains = sorted((n for n, node in api.items() if node["class_type"] == "IDDMTrain"), key=int)
        self.lane = {n: self._lane(n, sources, trains) for n in api}
        depth: dict[str, int] = {}

        def depth_of(n: str) -> int:
            if n not in depth:
                depth[n] = 1 + max((depth_of(s) for s in sources[n]), default=-1)
            return depth[n]

        self.column = {n: depth_of(n) for n in api}
        lane_columns = {self.column[n] for n in api if self.lane[n] is not None}
        for n in api:  # a source node goes just left of what reads it, where no lane runs
            if not sources[n] and consumers[n]:
                wanted = min(self.column[m] for m in consumers[n]) - 1
                if wanted not in lane_columns:
                    self.column[n] = wanted
        self.height = {n: _height(node["class_type"], defs[node["class_type"]]) for n, node in api.items()}
        self.pos, self.groups = {}, []
        shared_y: dict[int, int] = {}
        for n in sorted((n for n in api if self.lane[n] is None), key=int):
            y = shared_y.get(self.column[n], TOP)
            self.pos[n] = (TOP + COLUMN_WIDTH * self.column[n], y)
            shared_y[self.column[n]] = y + self.height[n] + GAP
        lane_top = TOP
        for lane, train in enumerate(trains):
            members = sorted((n for n in api if self.lane[n] == lane), key=int)
            cell_y: dict[int, int] = {}
            for n in members:
                y = cell_y.get(self.column[n], lane_top)
                self.pos[n] = (TOP + COLUMN_WIDTH * self.column[n], y)
                cell_y[self.column[n]] = y + self.height[n] + GAP
            bottom = max(cell_y.values()) - GAP
            if len(trains) > 1:
                left = min(self.pos[n][0] for n in members) - 20
                right = max(self.pos[n][0] for n in members) + NODE_WIDTH + 20
                self.groups.append({"title": api[train]["_meta"]["title"],
                                    "bounding": [left, lane_top - GROUP_TITLE, right - left,
                                                 bottom - lane_top + GROUP_TITLE + 20],
                                    "color": "#3f789e", "font_size": 24})
            lane_top = bottom + LANE_GAP

    @staticmethod
    def _lane(n: str, sources: dict, trains: list[str]) -> int | None:
        """The lane of the one IDDM Train a node depends on (None: shared, or on several)."""
        upstream, todo = set(), [n]
        while todo:
            m = todo.pop()
            if m not in upstream:
                upstream.add(m)
                todo.extend(sources[m])
        above = [i for i, t in enumerate(trains) if t in upstream]
        return above[0] if len(above) == 1 else None


def _layout(api: dict, defs: dict) -> _Layout:
    return _Layout(api, defs)


# What ComfyUI's canvas draws (LiteGraph's computeSize, measured on 0.3.64): 20 px per row of
# sockets, 24 per widget, a panel's own height + 4, 14 of margins; text boxes and previews get room.
PANELS = {"IDDMTrain": 250 + 4, "IDDMLoadProtectedLoRA": 80 + 4, "IDDMIdentitySimilarity": 64 + 4,
          "CLIPTextEncode": 100, "PreviewImage": 240}


def _height(class_type: str, d: dict) -> int:
    widgets = sum(1 + bool(s.get("control_after_generate")) for s in d["inputs"].values()
                  if s["type"] in WIDGET_TYPES)
    sockets = max(len(d["outputs"]), sum(1 for s in d["inputs"].values() if s["type"] not in WIDGET_TYPES))
    return 14 + 20 * sockets + 24 * widgets + PANELS.get(class_type, 0)


def ui_to_api(ui: dict, defs: dict) -> dict:
    """The inverse (what the canvas queues): widgets_values back to named inputs, links to [id, slot]."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        d = defs[node["type"]]
        values = list(node.get("widgets_values", []))
        inputs: dict[str, Any] = {}
        for name, spec in d["inputs"].items():
            if spec["type"] in WIDGET_TYPES:
                if not values:
                    raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name}")
                inputs[name] = values.pop(0)
                if spec.get("control_after_generate"):
                    values.pop(0)
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget value(s) too many")
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title", node["type"])}}
    return api


# ----------------------------------------------------------------------------- validation

def validate_api(api: dict, defs: dict) -> list[str]:
    """Every node type exists, every required input is given, every link's type matches, every
    widget value is valid. Returns the problems found (empty = valid)."""
    problems = []
    for node_id, node in api.items():
        where = f"node {node_id} ({node.get('class_type')})"
        d = defs.get(node.get("class_type"))
        if d is None:
            problems.append(f"{where}: unknown node type")
            continue
        for name in node["inputs"]:
            if name not in d["inputs"]:
                problems.append(f"{where}: unknown input {name!r}")
        for name, spec in d["inputs"].items():
            value = node["inputs"].get(name)
            if value is None:
                if not spec["optional"]:
                    problems.append(f"{where}: required input {name!r} missing")
                continue
            if _is_link(value):
                source = api.get(value[0])
                if source is None or source.get("class_type") not in defs:
                    problems.append(f"{where}: input {name!r} links to missing node {value[0]}")
                    continue
                outputs = defs[source["class_type"]]["outputs"]
                if value[1] >= len(outputs):
                    problems.append(f"{where}: input {name!r} links to output {value[1]} of a node with {len(outputs)}")
                elif outputs[value[1]] != spec["type"]:
                    problems.append(f"{where}: input {name!r} wants {spec['type']} but gets {outputs[value[1]]}")
            elif spec["type"] not in WIDGET_TYPES:
                problems.append(f"{where}: input {name!r} ({spec['type']}) must be a link, got {value!r}")
            else:
                problem = widget_problem(spec, value)
                if problem:
                    problems.append(f"{where}: {name}={value!r}: {problem}")
    return problems


def widget_problem(spec: dict, value: Any) -> str | None:
    kind = spec["type"]
    if kind == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return "not a whole number"
    if kind == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "not a number"
    if kind in ("INT", "FLOAT"):
        if spec.get("min") is not None and value < spec["min"]:
            return f"below the minimum {spec['min']}"
        if spec.get("max") is not None and value > spec["max"]:
            return f"above the maximum {spec['max']}"
    if kind == "STRING" and not isinstance(value, str):
        return "not text"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return "not true/false"
    if kind == "COMBO" and spec.get("options") and value not in spec["options"]:
        return f"not one of {spec['options']}"
    return None


def render_all() -> dict[Path, dict]:
    defs = node_definitions()
    files = {}
    for name, build in GRAPHS.items():
        api = build(defs)
        files[WORKFLOWS / "api" / f"{name}.json"] = api
        files[ui_path(name)] = to_ui(api, defs)
    return files


def dump(data: dict) -> str:
    return json.dumps(data, indent=1) + "\n"


TEMPLATES_JS = REPO / "web" / "templates.js"


def templates_js() -> str:
    descriptions = {t.title: t.description for t in TEMPLATES.values()}
    return ("// Written by tests/workflow_graphs.py: the descriptions of the pack's templates, by title (file name).\n"
            f"export const TEMPLATE_DESCRIPTIONS = {json.dumps(descriptions, indent=2, ensure_ascii=False)};\n")


if __name__ == "__main__":
    for path, data in render_all().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump(data))
        print("wrote", path.relative_to(REPO))
    TEMPLATES_JS.write_text(templates_js())
    print("wrote", TEMPLATES_JS.relative_to(REPO))
