"""The ComfyUI Denoiser adapter against the diffusers one, on the same random SD1.5 checkpoint.

usage (under ComfyUI's Python, with ComfyUI on sys.path): equivalence_check.py CHECKPOINT
Loads the checkpoint with ComfyUI's own loader for nodes/comfy_denoiser.py, converts the same
weights to diffusers (UNet2DConditionModel + AutoencoderKL) for comfyui_iddm's DiffusersDenoiser,
gives both the same LoRA (non-zero), and compares one fine-tune step (L_rec and its LoRA gradients)
and one PGD step of each stage (Stage I: L_rec; Stage II: decode(predict_x0) — the identity loss's
input — with a fixed linear read-out) and their gradients w.r.t. the photo. Then, on the ComfyUI
adapter alone: the same three steps with gradient checkpointing on (UNet and VAE blocks) give the
same gradients; a LoRA state of another model is a LoRAError; `release` puts the shared modules
back. Prints one JSON line.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from comfy_process import emit, load_checkpoint, load_pack, seeded_lora, shared_state, start_comfyui

CHECKPOINT = start_comfyui()[0]
import comfy.utils  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint  # noqa: E402

from comfyui_iddm.backends.diffusers_backend import DiffusersDenoiser, KLCodec  # noqa: E402
from comfyui_iddm.config import IDDMConfig  # noqa: E402
from comfyui_iddm.iddm import frozen  # noqa: E402
from comfyui_iddm.losses import NoiseDraw, denoised_prediction, reconstruction_loss  # noqa: E402
from comfyui_iddm.lora_io import LoRAError  # noqa: E402

comfy_denoiser = load_pack()


def diffusers_twin(model, vae, config: IDDMConfig, cond: torch.Tensor) -> DiffusersDenoiser:
    unet_state = {"model.diffusion_model." + k: v.float() for k, v in model.model.diffusion_model.state_dict().items()}
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(320,), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                cross_attention_dim=768, attention_head_dim=8)
    unet.load_state_dict(convert_ldm_unet_checkpoint(unet_state, unet.config), strict=True)
    vae_state = {"first_stage_model." + k: v.float() for k, v in vae.first_stage_model.state_dict().items()}
    autoencoder = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                scaling_factor=0.18215)
    autoencoder.load_state_dict(convert_ldm_vae_checkpoint(vae_state, autoencoder.config), strict=True)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return DiffusersDenoiser(unet, KLCodec(autoencoder), lambda prompts: cond.expand(len(prompts), -1, -1),
                             scheduler, config)


def ldm_to_diffusers_names(model) -> dict[str, str]:
    """kohya name with ComfyUI's (ldm) module path -> kohya name with the diffusers path."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    out = {}
    for diffusers_key, ldm_key in mapping.items():
        if diffusers_key.endswith(".weight") and ".attn" in diffusers_key and ".to_" in diffusers_key:
            out["lora_unet_" + ldm_key[: -len(".weight")].replace(".", "_")] = \
                "lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")
    return out


def rename(key: str, names: dict[str, str]) -> str:
    """A kohya key with the ldm module name -> the same key with the diffusers module name."""
    module, suffix = key.split(".", 1)
    return names[module] + "." + suffix


def lora_grads(denoiser, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Gradients of every LoRA matrix, keyed by diffusers-named kohya keys, for either adapter."""
    if hasattr(denoiser, "lora"):  # ComfyDenoiser: ldm names
        return {rename(f"{comfy_denoiser.kohya_name(path)}.{part}", names): getattr(adapter, part).grad.clone()
                for path, adapter in denoiser.lora.items() for part in ("down", "up")}
    grads = {}
    for name, param in denoiser.unet.named_parameters():
        for peft_part, part in ((".lora_A.", "down"), (".lora_B.", "up")):
            if peft_part in name:
                module = "lora_unet_" + name.split(peft_part)[0].replace(".", "_")
                grads[f"{module}.{part}"] = param.grad.clone()
    return grads


def max_relative_difference(grads: dict, reference: dict) -> float:
    return max(float((grads[k] - reference[k]).norm() / reference[k].norm().clamp_min(1e-20)) for k in grads)


@contextlib.contextmanager
def call_counts(model, vae) -> Iterator[dict]:
    """How often a layer inside a UNet transformer (which carries a LoRA, so every step's backward
    passes it) and inside the VAE encoder's and decoder's first resnet block runs: checkpointing runs
    them again in backward (hooks on inner layers see the recomputation)."""
    def first_layer(block):
        return next(m for m in block.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))

    autoencoder = vae.first_stage_model
    layers = {"unet": first_layer(model.model.diffusion_model.input_blocks[1][1]),
              "vae_encoder": first_layer(autoencoder.encoder.down[0].block[0]),
              "vae_decoder": first_layer(autoencoder.decoder.up[0].block[0])}
    counts = dict.fromkeys(layers, 0)
    handles = [layer.register_forward_pre_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
               for name, layer in layers.items()]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def lora_refusals(ours, twin, lora: dict) -> dict:
    """A LoRA state of another model loads as a LoRAError with its message, never a KeyError."""
    other_rank = {k: v if k.endswith(".alpha") else torch.cat([v, v], dim=0 if "down" in k else 1)
                  for k, v in lora.items()}
    out = {}
    for what, state in (("other_naming", twin.lora_state_dict()), ("other_rank", other_rank)):
        try:
            ours.load_lora_state_dict(state)
            out[what] = {"error": None}
        except Exception as error:  # noqa: BLE001 - which kind is what is checked
            out[what] = {"error": type(error).__name__, "is_lora_error": isinstance(error, LoRAError),
                         "message": str(error)}
    return out


def main(checkpoint: str) -> dict:
    torch.manual_seed(0)
    model, clip, vae = load_checkpoint(checkpoint)
    config = IDDMConfig(rank=4, lora_alpha=4.0, resolution=64, seed=0)
    results = {}
    before = shared_state(model, vae)
    with comfy_denoiser.training_mode():
        ours = comfy_denoiser.ComfyDenoiser(model, clip, vae, rank=4, lora_alpha=4.0, seed=0, mixed_precision="no")
        cond = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
        twin = diffusers_twin(model, vae, config, cond)
        names = ldm_to_diffusers_names(model)
        lora = seeded_lora(ours, seed=2)
        ours.load_lora_state_dict(lora)
        twin.load_lora_state_dict({rename(k, names): v for k, v in lora.items()})
        results["lora_modules"] = [len(ours.lora), len(names)]

        generator = torch.Generator().manual_seed(3)
        image = torch.rand(1, 3, 64, 64, generator=generator)
        noise = torch.randn(1, 4, 8, 8, generator=generator)
        draw = NoiseDraw(noise, torch.tensor([500]))
        readout = torch.randn(1, 3, 64, 64, generator=generator)

        def step(denoiser, kind):
            params = denoiser.trainable_parameters()
            for p in params:
                p.grad = None
            x = image.clone().requires_grad_(True)
            if kind == "ft":
                z0 = denoiser.encode(x)
                loss = reconstruction_loss(denoiser, z0.detach(), cond, draw)
                loss.backward()
                return float(loss.detach()), lora_grads(denoiser, names), z0.detach()
            with frozen(params):  # as in PGD: the model is frozen for the photo update
                z0 = denoiser.encode(x)
                if kind == "stage1":
                    loss = reconstruction_loss(denoiser, z0, cond, draw)
                else:
                    low_t = NoiseDraw(noise, torch.tensor([50]))
                    loss = (denoised_prediction(denoiser, z0, cond, low_t) * readout).mean()
                loss.backward()
            return float(loss.detach()), {"x": x.grad.clone()}, z0.detach()

        plain = {}
        for kind in ("ft", "stage1", "stage2"):
            with call_counts(model, vae) as calls:
                plain[kind] = loss_a, grads_a, z_a = step(ours, kind)
            results[f"{kind}_calls"] = {"plain": calls}
            loss_b, grads_b, z_b = step(twin, kind)
            results[kind] = {"loss": [loss_a, loss_b], "latent_max_diff": float((z_a - z_b).abs().max()),
                             "grad_max_rel_diff": max_relative_difference(grads_a, grads_b),
                             "grads_compared": len(grads_a)}
        # Gradient checkpointing (UNet and VAE blocks) recomputes activations; gradients must not change.
        ours.enable_gradient_checkpointing()
        results["checkpointed_blocks"] = len(ours._checkpointed)
        for kind in ("ft", "stage1", "stage2"):
            with call_counts(model, vae) as calls:
                loss_c, grads_c, _ = step(ours, kind)
            results[f"{kind}_calls"]["checkpointed"] = calls
            results[f"{kind}_checkpointed"] = {"loss": [loss_c, plain[kind][0]],
                                               "grad_max_rel_diff": max_relative_difference(grads_c, plain[kind][1])}
        results["lora_refusals"] = lora_refusals(ours, twin, lora)
        ours.release()
        results["released"] = {"before": before, "after": shared_state(model, vae, ours)}
    return results


if __name__ == "__main__":
    emit(main(CHECKPOINT))
