"""A random-weight Stable Diffusion 1.5 at its real size, as a user would have it on disk: one
single-file checkpoint in the original (CompVis/ldm) key layout, plus a local diffusers config
folder (no weights) for loading it offline. Only the weights are random; the architecture, the
key names, the fp16 storage and the loading path (`load_denoiser`, i.e. diffusers'
`StableDiffusionPipeline.from_single_file(..., config=DIR)`) are those of a real SD 1.5 file.

    python benchmarks/real_size_model.py [--cache DIR] [--size real|smoke]   # built once; prints the paths

The diffusers -> ldm key mapping is written here from the two architectures' module layouts;
tests/test_real_size_model.py checks it against diffusers' own ldm -> diffusers converters.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_CACHE = Path("~/.cache/comfyui-iddm/bench").expanduser()
CHECKPOINT_NAME = "model.safetensors"
CONFIG_FOLDER = "config"
TEXT_PREFIX = "cond_stage_model.transformer."
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class ModelShape:
    """Constructor arguments of the three networks; SD15 is the real one, tests use smaller ones."""
    name: str
    unet: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)


SD15 = ModelShape(
    name="sd15-random",
    unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
              block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
             block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215),
    # CLIP ViT-L/14's text tower as in SD 1.5's text_encoder/config.json (ids as in that file).
    text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
              hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1),
)

# The smallest checkpoint ComfyUI still detects as SD 1.5 (model_channels 320, context_dim 768): one
# UNet level with one resnet, SD 1.5's full VAE and text encoder (~0.45 GB). For CPU smoke runs.
SMOKE = ModelShape(
    name="sd15-smoke",
    unet={**SD15.unet, "block_out_channels": (320,), "layers_per_block": 1,
          "down_block_types": ("CrossAttnDownBlock2D",), "up_block_types": ("CrossAttnUpBlock2D",)},
    vae=SD15.vae, text=SD15.text,
)
SHAPES = {"real": SD15, "smoke": SMOKE}


@dataclass(frozen=True)
class BuiltModel:
    checkpoint: Path  # the single-file checkpoint (ldm keys, fp16)
    config_dir: Path  # the diffusers config folder for load_denoiser(config_dir=...)


# --- the networks --------------------------------------------------------------------------------
def build_networks(shape: ModelShape, seed: int = 0):
    """(unet, vae, text_encoder) with seeded random weights (fp32; the file stores them in fp16).

    Each module's own initialisation (PyTorch's fan-in scaling for UNet and VAE, CLIP's std 0.02)
    keeps activations finite through the whole depth, in fp16 too."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**shape.unet)
    vae = AutoencoderKL(**shape.vae)
    text_encoder = CLIPTextModel(CLIPTextConfig(**shape.text))
    return unet.eval(), vae.eval(), text_encoder.eval()


# --- diffusers -> ldm key names ------------------------------------------------------------------
UNET_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_module_names(config) -> dict[str, str]:
    """diffusers module path -> ldm module path for a UNet2DConditionModel (openaimodel.UNetModel).

    ldm numbers its blocks in one flat list per side: input_blocks[0] is conv_in, then per level
    `layers_per_block` (resnet, attention) pairs and a downsampler; output_blocks hold one more
    resnet per level, the upsampler sitting after the attention if the level has one."""
    per_level = config.layers_per_block
    names = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    levels = len(config.block_out_channels)
    for level, block_type in enumerate(config.down_block_types):
        for j in range(per_level):
            index = 1 + level * (per_level + 1) + j
            names[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{index}.0"
            if block_type.startswith("CrossAttn"):
                names[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
        if level < levels - 1:
            names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{(level + 1) * (per_level + 1)}.0.op"
    for level, block_type in enumerate(config.up_block_types):
        attention = block_type.startswith("CrossAttn")
        for j in range(per_level + 1):
            index = level * (per_level + 1) + j
            names[f"up_blocks.{level}.resnets.{j}"] = f"output_blocks.{index}.0"
            if attention:
                names[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{index}.1"
        if level < levels - 1:
            last = level * (per_level + 1) + per_level
            names[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{last}.{2 if attention else 1}.conv"
    return names


def vae_module_names(config) -> dict[str, str]:
    """diffusers module path -> ldm module path for an AutoencoderKL. ldm's decoder counts its
    levels from the lowest resolution up, so up_blocks[i] is up[levels - 1 - i]."""
    levels = len(config.block_out_channels)
    names = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        names.update({f"{side}.conv_in": f"{side}.conv_in", f"{side}.conv_out": f"{side}.conv_out",
                      f"{side}.conv_norm_out": f"{side}.norm_out",
                      f"{side}.mid_block.resnets.0": f"{side}.mid.block_1",
                      f"{side}.mid_block.resnets.1": f"{side}.mid.block_2",
                      f"{side}.mid_block.attentions.0": f"{side}.mid.attn_1"})
    for level in range(levels):
        for j in range(config.layers_per_block):
            names[f"encoder.down_blocks.{level}.resnets.{j}"] = f"encoder.down.{level}.block.{j}"
        for j in range(config.layers_per_block + 1):
            names[f"decoder.up_blocks.{level}.resnets.{j}"] = f"decoder.up.{levels - 1 - level}.block.{j}"
        if level < levels - 1:
            names[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"
            names[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = f"decoder.up.{levels - 1 - level}.upsample.conv"
    return names


def rename(key: str, modules: dict[str, str], parts_of: dict[str, dict[str, str]]) -> str:
    """Renames a parameter key by its longest module prefix, then the part inside that module
    (parts_of: marker -> part renaming, for the modules whose diffusers path contains the marker)."""
    module = max((m for m in modules if key.startswith(m + ".")), key=len, default=None)
    if module is None:
        raise KeyError(f"no ldm name for {key}")
    rest = key[len(module) + 1:]
    for marker, parts in parts_of.items():
        if marker in module:
            part = max((p for p in parts if rest.startswith(p + ".")), key=len, default=None)
            if part is not None:
                rest = parts[part] + rest[len(part):]
    return f"{modules[module]}.{rest}"


def to_ldm_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One state dict in the original single-file layout, every tensor of the three networks,
    stored in fp16 as released SD 1.5 files are."""
    state = {}
    unet_modules = unet_module_names(unet.config)
    for key, tensor in unet.state_dict().items():
        state[UNET_PREFIX + rename(key, unet_modules, {".resnets.": UNET_RESNET_PARTS})] = tensor
    vae_modules = vae_module_names(vae.config)
    for key, tensor in vae.state_dict().items():
        name = rename(key, vae_modules, {".resnets.": VAE_RESNET_PARTS, ".attentions.": VAE_ATTENTION_PARTS})
        if ".attentions." in key and tensor.ndim == 2:  # ldm's attention projections are 1x1 convs
            tensor = tensor[:, :, None, None]
        state[VAE_PREFIX + name] = tensor
    for key, tensor in text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel; the file keeps the text_model level either way.
        state[TEXT_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)] = tensor
    # Released SD 1.5 files carry CLIP's position ids (a buffer transformers no longer saves).
    positions = text_encoder.config.max_position_embeddings
    state[TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return {key: (tensor.half() if tensor.is_floating_point() else tensor).contiguous()
            for key, tensor in state.items()}


# --- the config folder ---------------------------------------------------------------------------
def write_config_folder(folder: Path, unet, vae, text_encoder) -> None:
    """What `--config-dir` takes: each network's config, SD's training schedule, a tokenizer."""
    from diffusers import DDPMScheduler

    unet.save_config(folder / "unet")
    vae.save_config(folder / "vae")
    text_encoder.config.save_pretrained(folder / "text_encoder")
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="epsilon", clip_sample=False, steps_offset=1).save_config(folder / "scheduler")
    write_byte_level_tokenizer(folder / "tokenizer", text_encoder.config.max_position_embeddings)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}, indent=2))


def write_byte_level_tokenizer(folder: Path, max_length: int) -> None:
    """A CLIP tokenizer with no merges: CLIP's 256 byte symbols, the same ending a word ("</w>"),
    and the two specials. CLIP's real vocabulary is not available offline; prompts still
    tokenize (one token per byte) to ids far below CLIP's 49408, framed by BOS and EOS."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))


# --- building and caching ------------------------------------------------------------------------
def write_model(folder: Path, shape: ModelShape = SD15, seed: int = 0) -> BuiltModel:
    from safetensors.torch import save_file

    built = BuiltModel(folder / CHECKPOINT_NAME, folder / CONFIG_FOLDER)
    networks = build_networks(shape, seed)
    save_file(to_ldm_state_dict(*networks), str(built.checkpoint))
    write_config_folder(built.config_dir, *networks)
    return built


def ensure_model(cache: Path = DEFAULT_CACHE, shape: ModelShape = SD15) -> BuiltModel:
    """The cached model, built on first use (~2 GB for SD15). A half-built folder never counts:
    it is written beside the cache entry and renamed into place when complete."""
    folder = Path(cache).expanduser() / shape.name
    built = BuiltModel(folder / CHECKPOINT_NAME, folder / CONFIG_FOLDER)
    if built.checkpoint.is_file() and (built.config_dir / "model_index.json").is_file():
        return built
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{shape.name}.", dir=folder.parent))
    try:
        write_model(scratch, shape)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder (default %(default)s)")
    parser.add_argument("--size", choices=sorted(SHAPES), default="real")
    args = parser.parse_args()
    built = ensure_model(args.cache, SHAPES[args.size])
    print(f"checkpoint {built.checkpoint} ({built.checkpoint.stat().st_size / 2**30:.2f} GiB)")
    print(f"config dir {built.config_dir}")


if __name__ == "__main__":
    main()
