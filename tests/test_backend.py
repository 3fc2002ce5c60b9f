"""The diffusers Denoiser adapter on the built-in tiny model: port conformance, exact codec, noise
schedule algebra, frozen base + seeded LoRA, kohya keys ComfyUI maps, LoRA round trip, loading errors;
then random SD-shaped diffusers folders and (with ComfyUI) a single-file checkpoint."""
from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import Attention
from safetensors.torch import save_file
from torch.nn import functional as F

from comfyui_iddm.backends.diffusers_backend import DiffusersDenoiser, ModelLoadError, load_denoiser
from comfyui_iddm.backends.tiny import LATENT_CHANNELS, build_tiny, tiny_unet
from comfyui_iddm.config import IDDMConfig
from comfyui_iddm.lora_io import load_lora, lora_metadata, save_lora
from comfyui_iddm.ports import Denoiser

PROMPT = "a photo of sks person"
CONFIG = IDDMConfig(resolution=64, seed=3, rank=4, lora_alpha=4.0)


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def denoiser(request) -> DiffusersDenoiser:
    return load_denoiser("tiny", CONFIG, prediction_type=request.param)


def images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def train_steps(d: DiffusersDenoiser, steps: int = 3, seed: int = 0) -> None:
    """A few real fine-tune steps (eq. 8 with the model's own target), deterministic given seed."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2)
    cond = d.encode_prompt([PROMPT])
    z0 = d.encode(images(2))
    for _ in range(steps):
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, d.schedule.num_train_timesteps, (2,), generator=gen)
        loss = F.mse_loss(d.predict(d.schedule.add_noise(z0, noise, t), t, cond), d.schedule.training_target(z0, noise, t))
        opt.zero_grad()
        loss.backward()
        opt.step()


def unet_output(d: DiffusersDenoiser) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(2, LATENT_CHANNELS, 8, 8, generator=gen)
    with torch.no_grad():
        return d.predict(z, torch.tensor([10, 600]), d.encode_prompt([PROMPT, "a photo of person"]))


def test_conforms_to_the_port_with_sd_shapes(denoiser):
    assert isinstance(denoiser, Denoiser)
    assert denoiser.schedule.num_train_timesteps == 1000
    x = images(2, 64)
    z = denoiser.encode(x)
    assert z.shape == (2, LATENT_CHANNELS, 8, 8)  # 8x smaller spatially, like SD's VAE
    cond = denoiser.encode_prompt([PROMPT])
    assert cond.shape == (1, 16, denoiser.unet.config.cross_attention_dim)
    t = torch.tensor([5, 500])
    out = denoiser.predict(denoiser.schedule.add_noise(z, torch.randn_like(z), t), t, cond)
    assert out.shape == z.shape and torch.isfinite(out).all()
    assert denoiser.decode(z).shape == x.shape


def test_tiny_codec_is_an_exact_inverse(denoiser):
    x = images(3, 128, seed=1)
    assert torch.allclose(denoiser.decode(denoiser.encode(x)), x, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multiple of 8"):
        denoiser.encode(torch.rand(1, 3, 60, 64))


def test_prompts_condition_deterministically(denoiser):
    a, b, a_again = (denoiser.encode_prompt([p]) for p in (PROMPT, "a photo of person", PROMPT))
    assert torch.equal(a, a_again)
    assert not torch.allclose(a, b)


def test_add_noise_and_target_match_the_sd_schedule(denoiser):
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    z0, noise = torch.randn(3, LATENT_CHANNELS, 4, 4), torch.randn(3, LATENT_CHANNELS, 4, 4)
    t = torch.tensor([0, 321, 999])
    assert torch.allclose(denoiser.schedule.add_noise(z0, noise, t), reference.add_noise(z0, noise, t), atol=1e-6)
    expected = noise if denoiser.schedule.prediction_type == "epsilon" else reference.get_velocity(z0, noise, t)
    assert torch.allclose(denoiser.schedule.training_target(z0, noise, t), expected, atol=1e-6)


def test_predict_x0_inverts_add_noise_given_the_true_target(denoiser):
    z0, noise = torch.randn(4, LATENT_CHANNELS, 4, 4), torch.randn(4, LATENT_CHANNELS, 4, 4)
    t = torch.tensor([0, 100, 500, 999])
    z_t = denoiser.schedule.add_noise(z0, noise, t)
    x0 = denoiser.schedule.predict_x0(z_t, t, denoiser.schedule.training_target(z0, noise, t))
    assert torch.allclose(x0, z0, atol=1e-4)
    wrong = denoiser.schedule.predict_x0(z_t, t, torch.zeros_like(noise))
    assert not torch.allclose(wrong, z0, atol=1e-2)


def test_x0_hat_tracks_the_photo_at_small_t(denoiser):
    """Why tiny has an invertible codec: Stage II's decode(predicted z0) stays close to x' at small t
    even with a random UNet, and gradients reach the pixels."""
    x = images(1, 64, seed=2).requires_grad_(True)
    z0 = denoiser.encode(x)
    t = torch.tensor([5])
    z_t = denoiser.schedule.add_noise(z0, torch.randn_like(z0), t)
    x0_hat = denoiser.decode(denoiser.schedule.predict_x0(z_t, t, denoiser.predict(z_t, t, denoiser.encode_prompt([PROMPT]))))
    assert (x0_hat - x).abs().mean() < 0.05
    (grad,) = torch.autograd.grad(x0_hat.sum(), x)
    assert grad.abs().sum() > 0


def test_only_the_lora_trains_and_starts_as_a_no_op(denoiser):
    trainable = {n for n, p in denoiser.unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {id(p) for p in denoiser.trainable_parameters()} == {
        id(p) for p in denoiser.unet.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in denoiser.prompt_encoder.parameters())
    assert not denoiser.unet.training
    base = build_tiny(denoiser.schedule.prediction_type).unet.eval()
    z, t = torch.randn(1, LATENT_CHANNELS, 8, 8), torch.tensor([50])
    cond = denoiser.encode_prompt([PROMPT])
    with torch.no_grad():
        assert torch.allclose(denoiser.predict(z, t, cond), base(z, t, encoder_hidden_states=cond).sample,
                              atol=1e-6)


def test_same_seed_gives_the_same_lora_and_another_seed_does_not():
    runs = []
    for seed in (3, 3, 4):
        d = load_denoiser("tiny", CONFIG.replace(seed=seed))
        train_steps(d, steps=3)
        runs.append(d.lora_state_dict())
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_kohya_keys_are_exactly_the_attention_projections_comfyui_maps():
    """ComfyUI maps `lora_unet_` + diffusers module path with . -> _ for every attention projection."""
    d = load_denoiser("tiny", CONFIG)
    unet = tiny_unet()
    attention = [name for name, m in unet.named_modules() if isinstance(m, Attention)]
    assert attention and all(name.endswith((".attn1", ".attn2")) for name in attention)
    expected = set()
    for name in attention:
        for projection in ("to_q", "to_k", "to_v", "to_out_0"):
            stem = "lora_unet_" + name.replace(".", "_") + "_" + projection
            expected |= {stem + ".lora_down.weight", stem + ".lora_up.weight", stem + ".alpha"}
    state = d.lora_state_dict()
    assert set(state) == expected
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in state
    for key, tensor in state.items():
        if key.endswith(".alpha"):
            assert tensor.ndim == 0 and tensor.item() == CONFIG.lora_alpha
        elif key.endswith(".lora_down.weight"):
            assert tensor.shape[0] == CONFIG.rank
        else:
            assert tensor.shape[1] == CONFIG.rank


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_saved_lora_loads_into_a_fresh_model_with_identical_output(tmp_path, prediction_type):
    trained = load_denoiser("tiny", CONFIG, prediction_type=prediction_type)
    train_steps(trained, steps=3)
    path = tmp_path / "person.safetensors"
    save_lora(path, trained.lora_state_dict(), lora_metadata(CONFIG, {"seconds_total": 1.5}))
    fresh = load_denoiser("tiny", CONFIG.replace(seed=99), prediction_type=prediction_type)
    assert not torch.allclose(unet_output(fresh), unet_output(trained), atol=1e-4)
    state, _ = load_lora(path)
    fresh.load_lora_state_dict(state)
    assert torch.allclose(unet_output(fresh), unet_output(trained), atol=1e-6, rtol=0)


def test_a_file_alpha_other_than_the_models_keeps_the_lora_effect():
    trained = load_denoiser("tiny", CONFIG)
    train_steps(trained, steps=2)
    other = load_denoiser("tiny", CONFIG.replace(lora_alpha=1.0))
    other.load_lora_state_dict(trained.lora_state_dict())
    assert torch.allclose(unet_output(other), unet_output(trained), atol=1e-5, rtol=0)


def test_loading_a_lora_of_another_rank_or_model_says_what_is_wrong():
    other_rank = load_denoiser("tiny", CONFIG.replace(rank=8)).lora_state_dict()
    with pytest.raises(ValueError, match="rank"):
        load_denoiser("tiny", CONFIG).load_lora_state_dict(other_rank)
    foreign = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 8)}
    with pytest.raises(ValueError, match="does not fit this model"):
        load_denoiser("tiny", CONFIG).load_lora_state_dict(foreign)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        d = load_denoiser("tiny", CONFIG.replace(gradient_checkpointing=checkpointing))
        assert d.unet.is_gradient_checkpointing == checkpointing
        train_steps(d, steps=1)
        grads.append(torch.cat([p.detach().flatten() for p in d.trainable_parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bf16_is_honoured_on_cpu_with_a_float32_lora():
    d = load_denoiser("tiny", CONFIG.replace(mixed_precision="bf16"))
    assert d.compute_dtype == torch.bfloat16
    frozen = [p for n, p in d.unet.named_parameters() if ".lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in d.trainable_parameters())
    out = d.predict(torch.randn(1, LATENT_CHANNELS, 8, 8), torch.tensor([1]), d.encode_prompt([PROMPT]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    train_steps(d, steps=1)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in d.trainable_parameters())


def test_a_non_diffusion_safetensors_base_is_refused_by_name(tmp_path):
    lora = tmp_path / "not_a_model.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ModelLoadError, match=r"not_a_model\.safetensors is not a Stable Diffusion checkpoint"):
        load_denoiser(str(lora), CONFIG)
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"broken\.safetensors could not be read"):
        load_denoiser(str(garbage), CONFIG)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"notes\.txt is not a checkpoint file"):
        load_denoiser(str(text), CONFIG)
    with pytest.raises(ModelLoadError, match="lacks"):
        load_denoiser(str(tmp_path), CONFIG)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_denoiser(str(tmp_path / "missing.safetensors"), CONFIG)


def test_a_ckpt_is_read_without_pickle(tmp_path):
    """A .ckpt with a pickled object (not just tensors) is refused rather than executed."""
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "obj": IDDMConfig()}, path)
    with pytest.raises(ModelLoadError, match=r"evil\.ckpt could not be read"):
        load_denoiser(str(path), CONFIG)


def write_random_sd_folder(root, prediction_type: str = "epsilon") -> None:
    """A diffusers SD1.5-layout folder with random weights at toy width (no downloads; the tokenizer
    is a byte-level CLIP BPE without merges, enough to tokenize prompts)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 16, 32, 32), cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).save_pretrained(root / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, scaling_factor=0.18215,
    ).save_pretrained(root / "vae")
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars]
                                        + ["<|startoftext|>", "<|endoftext|>"])}
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                 num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                 bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
                  ).save_pretrained(root / "text_encoder")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type=prediction_type).save_pretrained(root / "scheduler")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_diffusers_folder_loads_and_trains(tmp_path, prediction_type):
    write_random_sd_folder(tmp_path, prediction_type)
    d = load_denoiser(str(tmp_path), CONFIG)
    assert isinstance(d, Denoiser) and d.schedule.prediction_type == prediction_type
    x = images(1, 64).requires_grad_(True)
    z0 = d.encode(x)
    assert z0.shape == (1, 4, 8, 8)
    cond = d.encode_prompt([PROMPT, "a photo of person"])
    assert cond.shape == (2, 77, 32) and not torch.allclose(cond[0], cond[1])
    t = torch.tensor([20])
    x0_hat = d.decode(d.schedule.predict_x0(d.schedule.add_noise(z0, torch.randn_like(z0), t), t, d.predict(z0, t, cond[:1])))
    assert x0_hat.shape == x.shape
    (grad,) = torch.autograd.grad(x0_hat.sum(), x)
    assert grad.abs().sum() > 0
    train_steps(d, steps=1)
    state = d.lora_state_dict()
    assert state and all(k.startswith("lora_unet_") and "_attn" in k for k in state)
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith(".lora_up.weight"))
    assert not any(p.requires_grad for p in d.codec.vae.parameters())


def write_sd15_config_folder(root, unet_config: dict) -> None:
    """A diffusers config folder without weights (what --config-dir takes): SD1.5's VAE and CLIP-L
    shapes, the given UNet config, SD's scheduler, a byte-level CLIP tokenizer."""
    from transformers import CLIPTextConfig, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    def dump(sub: str, name: str, values: dict) -> None:
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "config.json").write_text(json.dumps({"_class_name": name, **values}))

    dump("unet", "UNet2DConditionModel", unet_config)
    dump("vae", "AutoencoderKL", {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512, "scaling_factor": 0.18215})
    CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   projection_dim=768, hidden_act="quick_gelu").save_pretrained(root / "text_encoder")
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars]
                                        + ["<|startoftext|>", "<|endoftext|>"])}
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(root / "tokenizer")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, steps_offset=1).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None]}))


# Runs in ComfyUI's interpreter: the kohya LoRA keys ComfyUI maps for a checkpoint (argv[1]).
_COMFY_LORA_KEYS = r'''
import json, sys
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.lora, comfy.sd
model = comfy.sd.load_checkpoint_guess_config(sys.argv[1], output_vae=False, output_clip=False)[0]
print(json.dumps(sorted(k for k in comfy.lora.model_lora_keys_unet(model.model, {}) if k.startswith("lora_unet_"))))
'''


@pytest.mark.slow
@pytest.mark.comfyui
def test_a_single_file_sd15_checkpoint_loads_offline_and_comfyui_maps_its_lora_keys(tmp_path):
    """The random SD1.5 single file the ComfyUI tests build (channel_mult [1], one res block)."""
    import subprocess

    from comfyui_fixtures import comfyui_path, comfyui_python, ensure_tiny_checkpoint

    root = comfyui_path()
    if root is None:
        pytest.skip("needs $COMFYUI_PATH (the tiny SD1.5 checkpoint is built with ComfyUI's modules)")
    checkpoint = ensure_tiny_checkpoint(root)
    write_sd15_config_folder(tmp_path, {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [320], "down_block_types": ["CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D"], "cross_attention_dim": 768, "attention_head_dim": 8})
    d = load_denoiser(str(checkpoint), CONFIG, config_dir=str(tmp_path))
    assert d.base_model_version == "sd_v1" and d.schedule.prediction_type == "epsilon"
    z0 = d.encode(images(1, 64))
    cond = d.encode_prompt([PROMPT])
    assert z0.shape == (1, 4, 8, 8) and cond.shape == (1, 77, 768)
    t = torch.tensor([10])
    assert torch.isfinite(d.predict(d.schedule.add_noise(z0, torch.randn_like(z0), t), t, cond)).all()
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in d.lora_state_dict()}
    assert len(stems) == 4 * 2 * 4  # transformer blocks (1 down, 1 mid, 2 up) x attn1/attn2 x q,k,v,out
    comfy = subprocess.run([comfyui_python(), "-c", _COMFY_LORA_KEYS, str(checkpoint)], cwd=root,
                           capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(root)})
    assert comfy.returncode == 0, comfy.stderr[-3000:]
    assert stems <= set(json.loads(comfy.stdout.strip().splitlines()[-1]))


def test_both_doors_start_their_lora_from_the_one_kohya_initialisation():
    """The CLI door (peft) and the ComfyUI door (weight wrappers) draw lora_down from the same
    function and seed, and start lora_up at zero: the same lr trains the same way in both."""
    import pack_nodes
    from comfyui_iddm.backends.diffusers_backend import lora_modules
    from comfyui_iddm.lora_io import kaiming_uniform_down

    comfy_door = pack_nodes.load("comfy_denoiser")
    adapter = comfy_door.LoRAWeight(torch.zeros(320, 768), 4, 4.0, torch.Generator().manual_seed(5))
    assert torch.equal(adapter.down.detach(), kaiming_uniform_down(4, 768, torch.Generator().manual_seed(5)))
    assert adapter.down.dtype == adapter.up.dtype == torch.float32 and not adapter.up.any()

    d = load_denoiser("tiny", CONFIG)
    generator = torch.Generator().manual_seed(CONFIG.seed)
    for module in lora_modules(d.unet).values():
        down, up = module.lora_A["default"].weight, module.lora_B["default"].weight
        assert torch.equal(down, kaiming_uniform_down(CONFIG.rank, down.shape[1], generator))
        assert down.dtype == up.dtype == torch.float32 and not up.any()
