"""The ComfyUI Denoiser adapter against the diffusers one, on the same random SD1.5 checkpoint.

usage (under ComfyUI's Python, with ComfyUI on sys.path): equivalence_check.py CHECKPOINT
Loads the checkpoint with ComfyUI's own loader for nodes/comfy_denoiser.py, converts the same
weights to diffusers (UNet2DConditionModel + AutoencoderKL) for comfyui_iddm's DiffusersDenoiser,
gives both the same LoRA (non-zero), and compares one fine-tune step (L_rec and its LoRA gradients)
and one PGD step of each stage (Stage I: L_rec; Stage II: decode(predict_x0) — the identity loss's
input — with a fixed linear read-out) and their gradients w.r.t. the photo. Prints one JSON line.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

import comfy.cli_args

comfy.cli_args.args.cpu = True
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint  # noqa: E402

from comfyui_iddm.backends.diffusers_backend import DiffusersDenoiser, KLCodec  # noqa: E402
from comfyui_iddm.config import IDDMConfig  # noqa: E402
from comfyui_iddm.losses import NoiseDraw, denoised_prediction, reconstruction_loss  # noqa: E402

PACK = Path(__file__).resolve().parents[2]


def load_pack():
    spec = importlib.util.spec_from_file_location("iddm_pack", PACK / "__init__.py",
                                                  submodule_search_locations=[str(PACK)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["iddm_pack"] = module
    spec.loader.exec_module(module)
    from iddm_pack.nodes import comfy_denoiser
    return comfy_denoiser


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
        return {rename(f"{denoiser_module_name(path)}.{part}", names): getattr(adapter, part).grad.clone()
                for path, adapter in denoiser.lora.items() for part in ("down", "up")}
    grads = {}
    for name, param in denoiser.unet.named_parameters():
        for peft_part, part in ((".lora_A.", "down"), (".lora_B.", "up")):
            if peft_part in name:
                module = "lora_unet_" + name.split(peft_part)[0].replace(".", "_")
                grads[f"{module}.{part}"] = param.grad.clone()
    return grads


def denoiser_module_name(path: str) -> str:
    return "lora_unet_" + path[len("diffusion_model."):].replace(".", "_")


def main(checkpoint: str) -> dict:
    comfy_denoiser = load_pack()
    torch.manual_seed(0)
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(checkpoint)[:3]
    config = IDDMConfig(rank=4, lora_alpha=4.0, resolution=64, seed=0)
    results = {}
    with comfy_denoiser.training_mode():
        ours = comfy_denoiser.ComfyDenoiser(model, clip, vae, rank=4, lora_alpha=4.0, seed=0)
        cond = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
        twin = diffusers_twin(model, vae, config, cond)
        names = ldm_to_diffusers_names(model)
        generator = torch.Generator().manual_seed(2)
        lora = {}
        for key, value in ours.lora_state_dict().items():
            lora[key] = value if key.endswith(".alpha") else torch.randn(value.shape, generator=generator) * 0.05
        ours.load_lora_state_dict(lora)
        twin.load_lora_state_dict({rename(k, names): v for k, v in lora.items()})
        results["lora_modules"] = [len(ours.lora), len(names)]

        image = torch.rand(1, 3, 64, 64, generator=generator)
        noise = torch.randn(1, 4, 8, 8, generator=generator)
        draw = NoiseDraw(noise, torch.tensor([500]))
        readout = torch.randn(1, 3, 64, 64, generator=generator)

        def step(denoiser, kind):
            x = image.clone().requires_grad_(True)
            z0 = denoiser.encode(x)
            if kind == "ft":
                loss = reconstruction_loss(denoiser, z0.detach(), cond, draw)
                loss.backward()
                return loss, lora_grads(denoiser, names), z0
            if kind == "stage1":
                loss = reconstruction_loss(denoiser, z0, cond, draw)
            else:
                low_t = NoiseDraw(noise, torch.tensor([50]))
                loss = (denoised_prediction(denoiser, z0, cond, low_t) * readout).mean()
            for p in denoiser.trainable_parameters():
                p.requires_grad_(False)
            loss.backward()
            for p in denoiser.trainable_parameters():
                p.requires_grad_(True)
            return loss, {"x": x.grad.clone()}, z0

        for kind in ("ft", "stage1", "stage2"):
            for d in (ours, twin):
                for p in d.trainable_parameters():
                    p.grad = None
            loss_a, grads_a, z_a = step(ours, kind)
            loss_b, grads_b, z_b = step(twin, kind)
            entry = {"loss": [float(loss_a.detach()), float(loss_b.detach())],
                     "latent_max_diff": float((z_a - z_b).detach().abs().max())}
            for name in grads_a:
                a, b = grads_a[name], grads_b[name]
                entry.setdefault("grad_max_rel_diff", 0.0)
                entry["grad_max_rel_diff"] = max(entry["grad_max_rel_diff"],
                                                 float((a - b).norm() / b.norm().clamp_min(1e-20)))
            entry["grads_compared"] = len(grads_a)
            results[kind] = entry
            if kind == "ft":
                ft_reference = grads_b
        # Gradient checkpointing recomputes activations; the gradients must not change.
        ours.enable_gradient_checkpointing()
        for p in ours.trainable_parameters():
            p.grad = None
        loss_c, grads_c, _ = step(ours, "ft")
        grads_b = ft_reference
        results["ft_checkpointed"] = {
            "loss": [float(loss_c.detach()), results["ft"]["loss"][1]],
            "grad_max_rel_diff": max(float((grads_c[k] - grads_b[k]).norm() / grads_b[k].norm().clamp_min(1e-20))
                                     for k in grads_c),
            "blocks": len(ours._checkpointed)}
        ours.release()
        results["released"] = not any("forward" in vars(block) for block in
                                      [*model.model.diffusion_model.input_blocks, *model.model.diffusion_model.output_blocks])
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
