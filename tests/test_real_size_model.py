"""benchmarks/real_size_model.py at toy width: its diffusers -> ldm key mapping is exactly what
diffusers' own ldm -> diffusers converters invert, and the file it writes loads offline through
load_denoiser (diffusers' from_single_file with the written config folder) with every weight intact."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from real_size_model import SD15, ModelShape, build_networks, to_ldm_state_dict, write_model  # noqa: E402

from comfyui_iddm.backends.diffusers_backend import load_denoiser  # noqa: E402
from comfyui_iddm.config import IDDMConfig  # noqa: E402

# SD 1.5's block layout at toy width; CLIP keeps its real vocabulary size and context length.
SMALL = ModelShape(
    name="sd15-small",
    unet={**SD15.unet, "sample_size": 8, "block_out_channels": (32, 64), "cross_attention_dim": 32,
          "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
          "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
    vae={**SD15.vae, "block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2,
         "up_block_types": ("UpDecoderBlock2D",) * 2, "sample_size": 64},
    text={**SD15.text, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
          "num_attention_heads": 2, "projection_dim": 32},
)


@pytest.fixture(scope="module")
def networks():
    return build_networks(SMALL)


def assert_same_tensors(converted: dict, source: dict) -> None:
    """Same keys, shapes and values (the file stores fp16: the source is compared at fp16)."""
    assert sorted(converted) == sorted(source)
    for key, tensor in source.items():
        assert converted[key].shape == tensor.shape, key
        assert torch.equal(converted[key].half(), tensor.half()), key


def test_diffusers_converters_map_the_file_back_to_the_source_state_dicts(networks):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    unet, vae, text_encoder = networks
    state = to_ldm_state_dict(unet, vae, text_encoder)
    assert_same_tensors(convert_ldm_unet_checkpoint(state, unet.config), unet.state_dict())
    assert_same_tensors(convert_ldm_vae_checkpoint(state, vae.config), vae.state_dict())
    clip = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}
    clip.pop("embeddings.position_ids")  # in released files; transformers keeps it as a non-saved buffer
    assert_same_tensors(clip, {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()})


def test_the_original_layout_names_and_shapes(networks):
    state = to_ldm_state_dict(*networks)
    assert state["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"].shape == (32, 32)
    assert state["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (64, 64, 3, 3)  # upsampler
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in state
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "first_stage_model.decoder.up.1.block.2.conv2.weight" in state
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight" in state
    assert all(t.dtype == torch.float16 for k, t in state.items() if not k.endswith("position_ids"))


def test_the_written_file_loads_offline_with_every_weight_and_a_working_tokenizer(tmp_path, networks):
    from transformers import CLIPTokenizer

    built = write_model(tmp_path, SMALL)
    tokenizer = CLIPTokenizer.from_pretrained(built.config_dir / "tokenizer")
    ids = tokenizer("a photo of sks person").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) > 3
    assert max(ids) < SD15.text["vocab_size"] and tokenizer.model_max_length == 77

    denoiser = load_denoiser(str(built.checkpoint), IDDMConfig(resolution=64), config_dir=str(built.config_dir))
    unet, vae, text_encoder = networks
    loaded_unet = {k: v for k, v in denoiser.unet.state_dict().items() if "lora_" not in k}
    assert_same_tensors({k.replace(".base_layer", ""): v for k, v in loaded_unet.items()}, unet.state_dict())
    assert_same_tensors(denoiser.codec.vae.state_dict(), vae.state_dict())
    assert_same_tensors(denoiser.prompt_encoder.text_encoder.state_dict(), text_encoder.state_dict())
    cond = denoiser.encode_prompt(["a photo of sks person"])
    assert cond.shape == (1, 77, 32) and torch.isfinite(cond).all()
