"""What each IDDM node takes and gives, as plain data.

ComfyUI's V3 schema is built from this at load time (nodes/schema.py); CI, which has no ComfyUI,
validates the shipped workflow files against the same declarations (tests/test_workflows.py).
Tooltips of the IDDM knobs come from comfyui_iddm.config.KNOBS, the one place they are written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from comfyui_iddm.apdm import APDM_KNOBS, LORA_PROTECTION, PROTECT_LOSSES, APDMConfig
from comfyui_iddm.cloak import cloak_config
from comfyui_iddm.config import KNOBS, PIXEL_RANGES, IDDMConfig
from comfyui_iddm.precision import MIXED_PRECISION

CATEGORY = "IDDM privacy"
IDDM_LORA = "IDDM_LORA"  # custom type: a trained protected LoRA (weights + name + settings)
IDDM_OPTIONS = "IDDM_OPTIONS"  # custom type: the settings of IDDM Train Options

# Widget types carry a value in the graph; the rest are sockets (links between nodes).
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# Combo lists filled from the ComfyUI installation when the schema is built.
PHOTO_FOLDERS = "photo_folders"  # folders of images inside the private-photos root
LORA_FILES = "lora_files"  # files in models/loras
RECOGNIZER_CHOICES = "recognizer_choices"  # "auto" + recognizers whose weights are present
RID_NETWORKS = "rid_networks"  # files in models/iddm_rid

# ComfyUI's model folder of RID networks (models/iddm_rid; nodes/places.py registers it).
RID_FOLDER = "iddm_rid"
# IDDM Cloak Photos' first rid_weights entry, always listed: no network chosen (what the shipped
# graphs hold, a listed value on every server) and where to put one while there is none.
NO_RID_NETWORK = f"(none: put RID networks in models/{RID_FOLDER})"

# Load Protected LoRA's list entry for "the LoRA at the 'lora' input": with it the shipped graphs
# hold a listed value (comfy-cli refuses values not in the server's list), and no file has this name
# (ComfyUI lists only files with a model extension).
CONNECTED_LORA = "(connected from IDDM Train)"


@dataclass(frozen=True)
class Port:
    name: str
    type: str
    tooltip: str = ""
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple[str, ...] = ()  # fixed COMBO choices (with options_from: the first ones)
    options_from: str | None = None  # COMBO choices found at load time (one of the names above)
    optional: bool = False
    multiline: bool = False
    seed: bool = False  # INT seeds get ComfyUI's "control after generate" widget
    display_name: str | None = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    output_node: bool = False
    hidden_unique_id: bool = False  # the node needs its own id (to address its web widgets)
    hidden_prompt: bool = False  # the node reads its own raw inputs from the prompt

    def input(self, name: str) -> Port:
        return next(p for p in self.inputs if p.name == name)


_DEFAULT = IDDMConfig()


def knob(name: str, type_: str, defaults: Any = _DEFAULT, knobs: dict = KNOBS, **limits: Any) -> Port:
    """A widget for an IDDM knob (or another method's, with its `knobs` table): the default (of
    `defaults`, IDDM's own unless given) and the tooltip come from the engine's config."""
    default = getattr(defaults, name)
    if type_ == "STRING" and isinstance(default, tuple):
        default = ",".join(str(v) for v in default)
    spec = knobs[name]
    bounds = {"min": spec.low, "max": spec.high}
    if spec.low_open and spec.low is not None:
        bounds["min"] = limits.pop("open_min")
    bounds.update(limits)
    if type_ not in ("INT", "FLOAT"):
        bounds = {k: v for k, v in bounds.items() if k not in ("min", "max")}
    return Port(name, type_, spec.help, default, **bounds)


LOAD_PHOTOS = NodeSpec(
    node_id="IDDMLoadPrivatePhotos",
    display_name="IDDM Load Private Photos",
    description=("Loads the person's photos from a folder inside your private-photos root (a folder "
                 "ComfyUI does not serve; by default ~/.local/share/comfyui-iddm/photos) or takes "
                 "images you connect, turns each upright, finds the face and crops a square around "
                 "it at the training size. The photos are read in place, never copied anywhere."),
    inputs=(
        Port("folder", "COMBO", "Folder of the person's photos, by its name inside your private-photos "
             "root: ~/.local/share/comfyui-iddm/photos (macOS ~/Library/Application Support/comfyui-iddm/"
             "photos, Windows %LOCALAPPDATA%\\comfyui-iddm\\photos) unless IDDM_PRIVATE_ROOT says "
             "otherwise; not ComfyUI's input folder, which ComfyUI serves to anyone who can reach it. "
             "Only folders that hold images are listed; never a full path, which would travel with "
             "every shared workflow. 8 or more clear, front-facing photos of one person work best.",
             options_from=PHOTO_FOLDERS),
        knob("resolution", "INT", step=8),
        Port("face_detector", "COMBO", "'auto' finds the face in each photo and crops around it; "
             "'none' assumes the photos are already face-centred portraits.",
             "auto", options=("auto", "none")),
        Port("show_file_names", "BOOLEAN", "Local debugging only: name skipped photos by their file "
             "name in the report and in error messages. ComfyUI keeps both in its history (open to "
             "anyone who can reach this server), so leave it off otherwise.", False, optional=True,
             display_name="show file names (local debugging)"),  # optional: older graphs lack it
        Port("images", "IMAGE", "Optional: use these images instead of the folder (e.g. from "
             "Load Image). They are cropped the same way.", optional=True),
    ),
    outputs=(
        Port("photos", "IMAGE", "The face crops, one per usable photo."),
        Port("report", "STRING", "How many photos were used, and which were skipped and why "
             "(photos are referred to by their number, not their file name, unless "
             "show_file_names is on)."),
    ),
)

SPLIT = NodeSpec(
    node_id="IDDMSplitReferenceProtection",
    display_name="IDDM Split Reference / Protection",
    description=("Splits the photos into two separate sets: the reference set teaches the model what "
                 "the person looks like, the protection set is the one IDDM changes so the trained "
                 "model's portraits are hard to match to the person. The paper uses 4 + 4."),
    inputs=(
        Port("photos", "IMAGE", "Face crops from IDDM Load Private Photos."),
        Port("reference_count", "INT", "How many photos go into the reference set; the rest are "
             "protected. Both sets must keep at least one photo.", 4, 1, 4096, 1),
        Port("mode", "COMBO", "Which photos become the reference: 'order' = the first ones, "
             "'random' = a seeded random choice, 'best' = the clearest, largest faces.",
             "order", options=("order", "random", "best")),
        Port("seed", "INT", "Seed of the 'random' split.", 0, 0, 2**63 - 1, seed=True),
    ),
    outputs=(
        Port("reference", "IMAGE", "Reference set Xc."),
        Port("protection", "IMAGE", "Protection set X0."),
    ),
)

TRAIN = NodeSpec(
    node_id="IDDMTrain",
    display_name="IDDM Train Protected LoRA",
    description=("Personalizes the model on the person's photos (a LoRA, like DreamBooth) while "
                 "nudging the protection photos, within an invisible-to-small budget, so that faces "
                 "the trained model draws are hard for face recognition to link to the person. "
                 "Saves the LoRA into models/loras. rho trades privacy (low) against likeness (high). "
                 "Every other setting is on the optional IDDM Train Options node."),
    inputs=(
        Port("model", "MODEL", "The diffusion model from Load Checkpoint (SD 1.x / 2.x)."),
        Port("clip", "CLIP", "The text encoder from Load Checkpoint."),
        Port("vae", "VAE", "The VAE from Load Checkpoint."),
        Port("reference", "IMAGE", "Reference set Xc (from the Split node)."),
        Port("protection", "IMAGE", "Protection set X0 (from the Split node)."),
        knob("rho", "FLOAT", step=0.05),
        knob("eta", "FLOAT", step=0.01),
        knob("tau", "FLOAT", step=0.01, open_min=0.001),
        knob("iterations", "INT"),
        Port("lora_name", "STRING", "File name of the LoRA in models/loras (no folders). Empty: a "
             "neutral name iddm_<date>_<random> is chosen. Careful: this name travels with every "
             "workflow you share, so don't name it after the person.", ""),
        knob("seed", "INT", seed=True),
        Port("resume", "BOOLEAN", "After a Cancel or a crash: continue the unfinished run of this "
             "lora_name from its last finished iteration (same result as an uninterrupted run). Each "
             "iteration is saved to a private folder in your user cache (never ComfyUI's output or "
             "temp), deleted when the run finishes. Needs the same lora_name and settings.",
             False, optional=True),  # optional: graphs written before it still load
        Port("options", IDDM_OPTIONS, "Optional: IDDM Train Options, for every other setting (PGD and "
             "fine-tune schedule, LoRA size, recognizers, prompts, precision, overwrite). Not "
             "connected: the defaults shown on that node.", optional=True),
        Port("class_images", "IMAGE", "Optional: images of other people of the same class for "
             "prior preservation (keeps the model from drawing everyone as this person). Needs "
             "prior_weight above 0 on IDDM Train Options; any size (centre-cropped to the photos' size).",
             optional=True),
    ),
    outputs=(
        Port("lora", IDDM_LORA, "The protected LoRA with its settings, for IDDM Load Protected LoRA "
             "in the same graph (the file does not exist yet when the graph is checked)."),
        Port("lora_name", "STRING", "The file name written into models/loras."),
        Port("decoupled_photos", "IMAGE", "The identity-decoupled protection photos X'. Only saved "
             "if you connect a save node."),
        Port("report", "STRING", "Settings and measured figures of the run (JSON)."),
    ),
    output_node=True,
    hidden_unique_id=True,
    hidden_prompt=True,  # reads option inputs that graphs written before IDDM Train Options give it
)

TRAIN_OPTIONS = NodeSpec(
    node_id="IDDMTrainOptions",
    display_name="IDDM Train Options",
    description=("The settings of IDDM Train beyond rho, eta, tau, K, the LoRA name and the seed: the "
                 "PGD and fine-tune schedule, the LoRA's size, the face recognizers, the prompts, "
                 "precision and memory. Connect it to IDDM Train's 'options' input; one node can feed "
                 "several Train nodes (e.g. a sweep over rho). Without it, IDDM Train uses these defaults."),
    inputs=(
        knob("pgd_steps", "INT"),
        knob("pgd_alpha", "FLOAT", step=0.001, open_min=0.0001),
        knob("ft_steps", "INT"),
        knob("stage2_timesteps", "STRING"),
        knob("lr", "FLOAT", step=1e-5, open_min=1e-7),
        knob("rank", "INT"),
        knob("lora_alpha", "FLOAT", step=1.0, open_min=0.01),
        knob("batch_size", "INT"),
        knob("recognizers", "STRING"),
        Port("face_detector", "COMBO", "'auto' finds the eyes, nose and mouth in each photo (the "
             "face recognizers need them); 'none' assumes face-centred crops such as IDDM Load "
             "Private Photos makes with its detector off.", "auto", options=("auto", "none")),
        knob("face_mask", "BOOLEAN"),
        knob("target_similarity", "FLOAT", step=0.05),
        knob("step_decay", "BOOLEAN"),
        knob("pixel_range", "COMBO", options=tuple(PIXEL_RANGES)),
        knob("instance_prompt", "STRING"),
        knob("class_prompt", "STRING"),
        knob("prior_weight", "FLOAT", step=0.1),
        knob("mixed_precision", "COMBO", options=MIXED_PRECISION),
        knob("gradient_checkpointing", "BOOLEAN"),
        knob("pgd_batch", "INT"),
        Port("overwrite", "BOOLEAN", "Replace an existing LoRA of the same name. Off: a name that "
             "is taken is refused before any training starts.", False),
    ),
    outputs=(
        Port("options", IDDM_OPTIONS, "These settings, for the 'options' input of IDDM Train."),
    ),
)

# IDDM Train's widgets before IDDM Train Options existed (pack 0.1), in the order UI-format graphs
# of that version store their values; web/iddm.js reads old graphs with the same list.
LEGACY_TRAIN_WIDGETS = (
    "instance_prompt", "rho", "eta", "tau", "iterations", "pgd_steps", "pgd_alpha", "ft_steps", "lr",
    "rank", "lora_alpha", "batch_size", "stage2_timesteps", "recognizers", "seed",
    "control_after_generate", "lora_name", "overwrite", "mixed_precision", "gradient_checkpointing",
    "face_detector", "class_prompt", "prior_weight", "pgd_batch", "face_mask", "target_similarity",
    "step_decay", "pixel_range", "resume")

SIMILARITY = NodeSpec(
    node_id="IDDMIdentitySimilarity",
    display_name="IDDM Identity Similarity",
    description=("Measures how strongly face recognition links the generated images to the person: "
                 "the cosine similarity of each generated face to the reference photos, and the "
                 "share of images with a detectable face (FSR). Lower similarity = more private."),
    inputs=(
        Port("generated", "IMAGE", "Images the (protected) model generated."),
        Port("reference", "IMAGE", "The person's reference photos."),
        Port("recognizer", "COMBO", "Face recognizer that measures. 'auto' picks one that was NOT "
             "used in training when one is available (an honest, held-out judge).",
             "auto", options_from=RECOGNIZER_CHOICES),
        Port("lora", IDDM_LORA, "Optional: the protected LoRA, so 'auto' knows which recognizers "
             "it was trained against.", optional=True),
    ),
    outputs=(
        Port("fsr", "FLOAT", "Face success rate: share of generated images in which a face is found."),
        Port("mean_similarity", "FLOAT", "Mean cosine similarity of the generated faces to the "
             "person (1 = same face; lower = harder to link)."),
        Port("per_image", "STRING", "Similarity of each generated image (JSON)."),
        Port("grid", "IMAGE", "The generated images, each labelled with its similarity."),
    ),
    output_node=True,
    hidden_unique_id=True,
)

LOAD_LORA = NodeSpec(
    node_id="IDDMLoadProtectedLoRA",
    display_name="IDDM Load Protected LoRA",
    description=("Applies a protected LoRA to the model and text encoder, like the stock LoRA loader, "
                 "and shows the IDDM settings and figures stored in it."),
    inputs=(
        Port("model", "MODEL", "The base model the LoRA was trained on."),
        Port("clip", "CLIP", "The text encoder of that model."),
        Port("lora_name", "COMBO", f"A LoRA file from models/loras; the ones IDDM made come first in "
             f"the list. '{CONNECTED_LORA}' (the first entry): the LoRA connected to the 'lora' input. "
             "A connected LoRA is used whatever is chosen here.", CONNECTED_LORA,
             options=(CONNECTED_LORA,), options_from=LORA_FILES),
        Port("strength_model", "FLOAT", "How strongly the LoRA changes the diffusion model.",
             1.0, -100.0, 100.0, 0.01),
        Port("strength_clip", "FLOAT", "How strongly the LoRA changes the text encoder.",
             1.0, -100.0, 100.0, 0.01),
        Port("lora", IDDM_LORA, "Optional: a LoRA just trained by IDDM Train in this graph.",
             optional=True),
    ),
    outputs=(
        Port("model", "MODEL", "The model with the LoRA applied."),
        Port("clip", "CLIP", "The text encoder with the LoRA applied."),
        Port("settings", "STRING", "The IDDM settings and figures stored with the LoRA (JSON)."),
    ),
)

SAVE_PUBLIC_IMAGE = NodeSpec(
    node_id="IDDMSavePublicImage",
    display_name="IDDM Save Public Image",
    description=("Saves images for publishing with nothing but the pixels. The stock Save Image node "
                 "writes the whole graph into every PNG (your photo folder's name, the LoRA's name, "
                 "every prompt and setting), and anyone you send the file to can read it. This node "
                 "writes no prompt, no workflow, no text of any kind."),
    inputs=(
        Port("images", "IMAGE", "The images to publish."),
        Port("filename_prefix", "STRING", "Start of the file names in ComfyUI's output folder ('sub/name' "
             "saves into a subfolder). File names travel with the images: don't name the person.",
             "portrait"),
        Port("format", "COMBO", "png: lossless. jpeg / webp: smaller files at the quality below. None of "
             "them carries metadata.", "png", options=("png", "jpeg", "webp")),
        Port("quality", "INT", "JPEG / WebP quality (100 = best); not used for PNG.", 95, 1, 100, 1),
    ),
    outputs=(),
    output_node=True,
)

_CLOAK_DEFAULT = cloak_config()
CLOAK_METHODS = ("aspl", "rid", "noise", "none")

CLOAK = NodeSpec(
    node_id="IDDMCloakPhotos",
    display_name="IDDM Cloak Photos",
    description=("Protects photos you are about to post: changes each one within a small budget (eta) so "
                 "that a model someone else personalizes on them (DreamBooth, a LoRA) learns you badly. "
                 "'aspl' is Anti-DreamBooth's method: it needs the model it protects against (MODEL, CLIP, "
                 "VAE of an SD 1.x / 2.x checkpoint) and takes minutes. 'rid' runs a trained RID network "
                 f"from models/{RID_FOLDER} instead (chosen in rid_weights): one forward pass per photo, no "
                 "checkpoint needed. Save the result with IDDM Save Public Image, which writes nothing but "
                 "the pixels."),
    inputs=(
        Port("images", "IMAGE", "The photos to cloak: square face crops whose side is a multiple of 8, "
             "e.g. from IDDM Load Private Photos."),
        Port("method", "COMBO", "aspl: Anti-DreamBooth's ASPL (raises a surrogate model's denoising loss "
             "on the photos; needs MODEL, CLIP and VAE). rid: a trained RID network cloaks each photo in "
             "one forward pass (choose it in rid_weights; needs no MODEL, CLIP or VAE). noise: random "
             "noise of the same budget, the control a cloak must beat. none: the photos unchanged.",
             "aspl", options=CLOAK_METHODS),
        knob("eta", "FLOAT", _CLOAK_DEFAULT, step=0.005),
        knob("pgd_alpha", "FLOAT", _CLOAK_DEFAULT, step=0.001, open_min=0.0001),
        knob("iterations", "INT", _CLOAK_DEFAULT),
        knob("pgd_steps", "INT", _CLOAK_DEFAULT),
        knob("ft_steps", "INT", _CLOAK_DEFAULT),
        knob("seed", "INT", _CLOAK_DEFAULT, seed=True),
        Port("model", "MODEL", "For aspl: the diffusion model from Load Checkpoint.", optional=True),
        Port("clip", "CLIP", "For aspl: the text encoder from Load Checkpoint.", optional=True),
        Port("vae", "VAE", "For aspl: the VAE from Load Checkpoint.", optional=True),
        knob("instance_prompt", "STRING", _CLOAK_DEFAULT, optional=True),
        knob("lr", "FLOAT", _CLOAK_DEFAULT, step=1e-5, open_min=1e-7, optional=True),
        knob("rank", "INT", _CLOAK_DEFAULT, optional=True),
        knob("pixel_range", "COMBO", _CLOAK_DEFAULT, options=tuple(PIXEL_RANGES), optional=True),
        knob("mixed_precision", "COMBO", _CLOAK_DEFAULT, options=MIXED_PRECISION, optional=True),
        # last: graphs saved before it existed keep their widget values in place
        Port("rid_weights", "COMBO", f"For rid: the network, a file in models/{RID_FOLDER} (the "
             ".safetensors `iddm rid-train` writes, or the authors' released .bin; README: RID). Press R "
             "after adding one. It cloaks at this node's eta (a network trained at another budget is "
             "rescaled). Not used by the other methods.", NO_RID_NETWORK, options=(NO_RID_NETWORK,),
             options_from=RID_NETWORKS, optional=True),
    ),
    outputs=(
        Port("cloaked", "IMAGE", "The cloaked photos, same size; connect IDDM Save Public Image to save them."),
        Port("report", "STRING", "Method, budget, change against the originals (largest pixel change, "
             "PSNR, SSIM) and time per photo (JSON; no names)."),
    ),
    hidden_unique_id=True,
)

_APDM_DEFAULT = APDMConfig(**LORA_PROTECTION)


def apdm_knob(name: str, type_: str, **limits: Any) -> Port:
    return knob(name, type_, _APDM_DEFAULT, APDM_KNOBS, **limits)


ANTI_PERSONALIZE = NodeSpec(
    node_id="IDDMAntiPersonalizeModel",
    display_name="IDDM Anti-Personalize Model",
    description=("APDM: changes the model so that a later personalization (DreamBooth, a LoRA) on one "
                 "person's photos fails, even on clean photos, while it still draws and learns everyone "
                 "else. For a model you give to others. The change is a LoRA saved into models/loras (load "
                 "it later with the stock LoraLoader, strength 1); the CLI (iddm immunize) can also change "
                 "every UNet weight, the paper's choice. Needs images of other people (class_images). "
                 "Slow: the authors' schedule is 800 iterations of 20 simulated personalization steps."),
    inputs=(
        Port("model", "MODEL", "The diffusion model to protect, from Load Checkpoint (SD 1.x / 2.x)."),
        Port("clip", "CLIP", "The text encoder from Load Checkpoint."),
        Port("vae", "VAE", "The VAE from Load Checkpoint."),
        Port("subject", "IMAGE", "Photos of the person the model must not learn: square face crops whose "
             "side is a multiple of 8 (IDDM Load Private Photos)."),
        Port("class_images", "IMAGE", "Images of other people of the class (e.g. generated with the class "
             "prompt): what the model should draw instead (DPO's preferred side) and keep drawing (prior "
             "preservation). Any size: centre-cropped to the photos' size."),
        Port("protection_name", "STRING", "File name of the protection LoRA in models/loras (no folders). "
             "Empty: a neutral name iddm_<date>_<random> is chosen. This name travels with every workflow "
             "you share: don't name it after the person.", ""),
        apdm_knob("iterations", "INT"),
        apdm_knob("ft_steps", "INT"),
        apdm_knob("lr", "FLOAT", step=1e-5, open_min=1e-8),
        apdm_knob("seed", "INT", seed=True),
        Port("resume", "BOOLEAN", "After a Cancel or a crash: continue the unfinished run of this "
             "protection_name from its last finished iteration (same result as an uninterrupted run). Each "
             "iteration is saved to a private folder in your user cache, deleted when the run finishes.",
             False, optional=True),
        apdm_knob("protect_loss", "COMBO", options=PROTECT_LOSSES, optional=True),
        apdm_knob("dpo_beta", "FLOAT", step=0.1, open_min=1e-4, optional=True),
        apdm_knob("prior_weight", "FLOAT", step=0.1, optional=True),
        apdm_knob("rank", "INT", optional=True),
        apdm_knob("batch_size", "INT", optional=True),
        apdm_knob("instance_prompt", "STRING", optional=True),
        apdm_knob("class_prompt", "STRING", optional=True),
        apdm_knob("mixed_precision", "COMBO", options=MIXED_PRECISION, optional=True),
        Port("overwrite", "BOOLEAN", "Replace an existing LoRA of the same name. Off: a name that is taken "
             "is refused before any training starts.", False, optional=True),
    ),
    outputs=(
        Port("model", "MODEL", "The protected model (the base model with the protection LoRA applied)."),
        Port("protection_name", "STRING", "The file name written into models/loras."),
        Port("report", "STRING", "Settings and figures: the denoising loss of the base and the protected "
             "model on the person's photos and on the class images (JSON; no names)."),
    ),
    hidden_unique_id=True,
)

ALL_NODES: tuple[NodeSpec, ...] = (LOAD_PHOTOS, SPLIT, TRAIN, SIMILARITY, LOAD_LORA, SAVE_PUBLIC_IMAGE,
                                   TRAIN_OPTIONS, CLOAK, ANTI_PERSONALIZE)
BY_ID = {spec.node_id: spec for spec in ALL_NODES}


def train_config_names() -> tuple[str, ...]:
    """The inputs of IDDM Train and IDDM Train Options that are IDDMConfig fields (everything else
    is door-only)."""
    from dataclasses import fields
    names = {f.name for f in fields(IDDMConfig)}
    return tuple(p.name for p in TRAIN.inputs + TRAIN_OPTIONS.inputs if p.name in names)


def train_option_names() -> tuple[str, ...]:
    """The settings IDDM Train Options carries (all of them widgets)."""
    return tuple(p.name for p in TRAIN_OPTIONS.inputs)
