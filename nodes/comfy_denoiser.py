"""The engine's Denoiser port (comfyui_iddm/ports.py) on ComfyUI's own MODEL / CLIP / VAE.

- Noise schedule and prediction type come from the model's model_sampling; the UNet is called
  through BaseModel.apply_model, so model patches and wrappers of the user's MODEL still apply.
  apply_model returns the denoised latent; it is linear in the raw UNet output, which is solved for.
- The port speaks diffusers' DDPM convention (z_t = sqrt(a) z0 + sqrt(1-a) eps, integer t);
  ComfyUI's sampler space is x = z0 + sigma eps with sigma = sqrt((1-a)/a), so x = z_t / sqrt(a).
- LoRA: rank-r adapters on the attention projections of every transformer block, added as weight
  wrappers on a clone of the ModelPatcher (ComfyUI's own TrainLoraNode does the same), named by
  ComfyUI's module paths -> kohya keys such as
  `lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`, which ComfyUI's LoRA loader maps.
- ComfyUI runs nodes under torch.inference_mode and its loaders create inference tensors, which
  autograd refuses to save for backward. Training runs under inference_mode(False) (see
  `training_mode`) and the frozen weights are replaced once by ordinary tensors of equal value.
"""
from __future__ import annotations

import contextlib
import functools
import re
from typing import Iterator, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

# Attention projections that get a LoRA (the set diffusers' and kohya's SD LoRAs train).
LORA_TARGET = re.compile(r"^diffusion_model\..*transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
KOHYA_PREFIX = "lora_unet_"


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """Autograd on, inference mode off: what training inside a ComfyUI node needs."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


class LoRAWeight(nn.Module):
    """W -> W + (alpha / rank) * up @ down, applied by ComfyUI's cast ops on every forward."""

    def __init__(self, weight: Tensor, rank: int, alpha: float, generator: torch.Generator) -> None:
        from comfyui_iddm.lora_io import kaiming_uniform_down

        super().__init__()
        out_features, in_features = weight.shape
        # The one initialisation both doors use (kohya's): down ~ Kaiming-uniform, up = 0.
        self.down = nn.Parameter(kaiming_uniform_down(rank, in_features, generator).to(weight.device))
        self.up = nn.Parameter(torch.zeros(out_features, rank, device=weight.device))
        self.alpha = float(alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.down.shape[0]

    def __call__(self, weight: Tensor) -> Tensor:
        delta = (self.up @ self.down) * self.scale
        return weight + delta.to(weight.dtype)

    # ComfyUI moves weight functions with their module (model_patcher.move_weight_functions).
    def move_to(self, device=None) -> int:
        self.to(device=device)
        return sum(p.numel() * p.element_size() for p in self.parameters())


def kohya_name(module_path: str) -> str:
    """`diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q` ->
    `lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`."""
    return KOHYA_PREFIX + module_path[len("diffusion_model."):].replace(".", "_")


class ComfyDenoiser:
    """Implements comfyui_iddm.ports.Denoiser. Build and use it inside `training_mode()`."""

    def __init__(self, model, clip, vae, *, rank: int, lora_alpha: float, seed: int,
                 mixed_precision: str = "no", gradient_checkpointing: bool = False) -> None:
        import comfy.model_management as mm
        import comfy.model_sampling as ms

        self.patcher = model.clone()
        self.base = self.patcher.model
        self.clip, self.vae = clip, vae
        sampling = self.base.model_sampling
        if isinstance(sampling, ms.EDM) or not isinstance(sampling, ms.EPS) or \
                not hasattr(sampling, "sigmas") or isinstance(sampling, ms.X0):
            raise ValueError(f"this model's sampling ({type(sampling).__mro__[1].__name__}) is not "
                             "supported; IDDM Train works with SD 1.x / 2.x style models "
                             "(epsilon or v-prediction, discrete timesteps).")
        if getattr(self.base, "adm_channels", 0):
            raise ValueError("this MODEL needs extra conditioning (SDXL-style size / pooled-text "
                             "inputs), which IDDM Train does not provide yet; use an SD 1.x / 2.x "
                             "checkpoint.")
        prediction_type = "v_prediction" if isinstance(sampling, ms.V_PREDICTION) else "epsilon"
        self.device = mm.get_torch_device()
        self.mixed_precision = mixed_precision

        generator = torch.Generator().manual_seed(seed)
        self.lora: dict[str, LoRAWeight] = {}
        for path, module in self.base.named_modules():
            if LORA_TARGET.match(path) and isinstance(module, nn.Linear):
                adapter = LoRAWeight(module.weight, rank, lora_alpha, generator)
                self.lora[path] = adapter
                self.patcher.add_weight_wrapper(f"{path}.weight", adapter)
        if not self.lora:
            raise ValueError("found no attention layers to attach a LoRA to in this MODEL; IDDM Train "
                             "needs an SD 1.x / 2.x UNet from Load Checkpoint.")

        mm.load_models_gpu([self.patcher, vae.patcher], force_full_load=True)
        for adapter in self.lora.values():
            adapter.to(self.device)
        _make_trainable_copies(self.base)
        _make_trainable_copies(vae.first_stage_model)
        from comfyui_iddm.diffusion import NoiseSchedule

        self._sigmas = sampling.sigmas.detach().float().to(self.device).clone()
        self.schedule = NoiseSchedule.from_sigmas(self._sigmas, prediction_type)
        self.compute_dtype = torch.float32
        self._checkpointed: list[nn.Module] = []
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()

    # -- text and VAE ---------------------------------------------------------------------------
    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        rows = []
        for prompt in prompts:
            with torch.no_grad():
                cond = self.clip.encode_from_tokens(self.clip.tokenize(prompt))
            rows.append(cond.detach().clone().float())
        return torch.cat(rows).to(self.device)

    def encode(self, images: Tensor) -> Tensor:
        vae = self.vae
        pixels = (images * 2.0 - 1.0).to(vae.device, vae.vae_dtype)
        latents = vae.first_stage_model.encode(pixels).float()
        return self.base.process_latent_in(latents.to(self.device))

    def decode(self, latents: Tensor) -> Tensor:
        vae = self.vae
        raw = self.base.process_latent_out(latents).to(vae.device, vae.vae_dtype)
        return ((vae.first_stage_model.decode(raw).float() + 1.0) / 2.0).to(self.device)

    # -- diffusion --------------------------------------------------------------------------------
    def predict(self, z_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The raw UNet output, solved from apply_model's denoised latent (linear in it)."""
        sigma = self._sigmas[t.to(self.device)]
        s = sigma.view(-1, *([1] * (z_t.ndim - 1)))
        x = z_t * (1 + s ** 2).sqrt()  # ComfyUI's sampler space
        denoised = self.base.apply_model(x, sigma, c_crossattn=cond).float()
        if self.schedule.prediction_type == "epsilon":  # denoised = x - out * sigma
            return (x - denoised) / s
        # v: denoised = x / (sigma^2 + 1) - out * sigma / sqrt(sigma^2 + 1)
        return (x / (s ** 2 + 1) - denoised) * (s ** 2 + 1).sqrt() / s

    # -- LoRA ---------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for adapter in self.lora.values() for p in (adapter.down, adapter.up)]

    def lora_state_dict(self) -> dict[str, Tensor]:
        state = {}
        for path, adapter in self.lora.items():
            name = kohya_name(path)
            state[name + ".lora_down.weight"] = adapter.down.detach().to("cpu", torch.float32).clone()
            state[name + ".lora_up.weight"] = adapter.up.detach().to("cpu", torch.float32).clone()
            state[name + ".alpha"] = torch.tensor(adapter.alpha)
        return state

    def load_lora_state_dict(self, state: dict[str, Tensor]) -> None:
        from comfyui_iddm.lora_io import match_lora

        adapters = {kohya_name(path): adapter for path, adapter in self.lora.items()}
        matched = match_lora(state, {name: (a.down.shape, a.up.shape) for name, a in adapters.items()},
                             next(iter(adapters.values())).alpha)
        with torch.no_grad():
            for name, (down, up) in matched.items():
                adapters[name].down.copy_(down)
                adapters[name].up.copy_(up)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each UNet block's activations in backward instead of keeping them (less memory,
        ~30% more time). Applied to ComfyUI's shared modules until `release`."""
        unet = self.base.diffusion_model
        blocks = [*getattr(unet, "input_blocks", []), getattr(unet, "middle_block", None),
                  *getattr(unet, "output_blocks", [])]
        for block in blocks:
            if block is not None and block not in self._checkpointed:
                block.forward = functools.partial(_checkpointed_call, block.forward)
                self._checkpointed.append(block)

    def release(self) -> None:
        """Detach the LoRA wrappers and checkpointing from ComfyUI's shared modules."""
        for block in self._checkpointed:
            del block.forward  # back to the class's forward
        self._checkpointed = []
        adapters = set(map(id, self.lora.values()))
        for module in self.base.modules():
            functions = getattr(module, "weight_function", None)
            if functions:
                module.weight_function = [f for f in functions if id(f) not in adapters]


def _checkpointed_call(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _make_trainable_copies(module: nn.Module) -> None:
    """Replace inference tensors (made by ComfyUI's loaders) with ordinary ones of equal value, so
    autograd can save them for backward. Values are unchanged; the swap is done once per model."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_inference():
                sub._parameters[name] = nn.Parameter(param.detach().clone(), requires_grad=False)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.is_inference():
                sub._buffers[name] = buffer.clone()
