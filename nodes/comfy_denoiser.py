"""The engine's Denoiser port (comfyui_iddm/ports.py) on ComfyUI's own MODEL / CLIP / VAE.

- What the MODEL is, is read from the MODEL itself: its model_sampling object patch (e.g. from
  ModelSamplingDiscrete / ModelSamplingSD3 nodes) via `get_model_object`, never from the shared
  model's currently applied patches. Epsilon and v-prediction with SD's discrete timesteps
  (ModelSamplingDiscrete) are trained; anything else (x0, flow / CONST, EDM, LCM, ...) is refused
  by name (`check_model`). The noise schedule is that model_sampling's sigma table.
- The port speaks diffusers' DDPM convention (z_t = sqrt(a) z0 + sqrt(1-a) eps, integer t);
  ComfyUI's sampler space is x = z0 + sigma eps with sigma = sqrt((1-a)/a), so x = z_t / sqrt(a).
  The UNet is called through BaseModel.apply_model, which returns the denoised latent; it is linear
  in the raw UNet output, which is solved for.
- What of the user's MODEL applies, as in ComfyUI's samplers (comfy/samplers.py calc_cond_batch):
  its weight patches (LoRAs) and object patches (applied when the clone is loaded); a copy of its
  model_options["transformer_options"] with the MODEL's wrappers and callbacks merged in, and
  "cond_or_uncond" = [0] (one positive chunk), "uuids", "sigmas" (this call's sigma per item) and
  "sample_sigmas" (the model's whole sigma table, descending, then 0) filled in, so attention
  patches / replacements, block patches and APPLY_MODEL / DIFFUSION_MODEL wrappers run; and
  model_options["model_function_wrapper"]. Not applied: what belongs to sampling rather than to one
  model call (CFG functions, sampler / outer-sample / predict-noise / calc-cond-batch wrappers,
  denoise masks) and hooks or ControlNets attached to conditioning (the prompt is encoded here).
- Precision: the LoRA weights (and so the optimizer state) are float32; each LoRAWeight computes
  its delta in float32 and adds it to the weight in the compute dtype. The compute dtype follows
  comfyui_iddm.precision.compute_dtype(mixed_precision, device, the UNet's stored dtype) and is
  applied the way ComfyUI's own TrainLoraNode does: `set_model_compute_dtype` on our clone (an
  object patch, undone by `release`) plus torch.autocast around the UNet call. The VAE computes in
  ComfyUI's own vae_dtype, except fp16 (--fp16-vae): SD's VAE overflows in fp16, and the photo
  gradient through it would flush to zero unless the loss were scaled, which the engine does only for
  an fp16 UNet; an fp16-stored VAE computes in float32 (weights cast per layer by ComfyUI's ops; the
  diffusers door likewise keeps its VAE in float32 under fp16). encode / decode / predict return float32.
- LoRA: rank-r adapters on the attention projections of every transformer block, added as weight
  wrappers on a clone of the ModelPatcher (as TrainLoraNode does), named by ComfyUI's module paths
  -> kohya keys such as `lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`, which
  ComfyUI's LoRA loader maps. A state of another model is refused by lora_io.match_lora (LoRAError).
- Gradient checkpointing covers the layers of the UNet's blocks and the VAE encoder's and decoder's
  blocks (the passes that carry photo gradients). `release` puts back everything set on ComfyUI's shared modules.
- ComfyUI runs nodes under torch.inference_mode and its loaders create inference tensors, which
  autograd refuses to save for backward. Training runs under inference_mode(False) (see
  `training_mode`) and the frozen weights are replaced once by ordinary tensors of equal value.
"""
from __future__ import annotations

import contextlib
import functools
import re
import uuid
from typing import Iterator, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from comfyui_iddm import lora_io

# Attention projections that get a LoRA (the set diffusers' and kohya's SD LoRAs train).
LORA_TARGET = re.compile(r"^diffusion_model\..*transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
UNET_PREFIX = "diffusion_model."
# How ComfyUI's prediction classes read in a message (the class that defines calculate_denoised).
PREDICTION_NAMES = {"EPS": "eps", "V_PREDICTION": "v_prediction", "X0": "x0", "CONST": "flow (CONST)",
                    "EDM": "EDM", "COSMOS_RFLOW": "rectified flow (COSMOS_RFLOW)", "LCM": "LCM"}
SUPPORTED_PREDICTIONS = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """Autograd on, inference mode off: what training inside a ComfyUI node needs."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _defining_class(obj, method: str) -> type:
    return next(c for c in type(obj).__mro__ if method in vars(c))


def check_model(model) -> str:
    """The prediction type ('epsilon' or 'v_prediction') of this MODEL, decided by its own
    model_sampling (object patches included); a ValueError naming its sampling otherwise."""
    import comfy.model_sampling as ms

    sampling = model.get_model_object("model_sampling")
    prediction = _defining_class(sampling, "calculate_denoised").__name__
    timesteps = _defining_class(sampling, "timestep")
    supported = prediction in SUPPORTED_PREDICTIONS and _defining_class(sampling, "calculate_input") is ms.EPS \
        and timesteps is ms.ModelSamplingDiscrete and _defining_class(sampling, "sigma") is ms.ModelSamplingDiscrete
    if not supported:
        kind = PREDICTION_NAMES.get(prediction, prediction)
        raise ValueError(f"this MODEL samples as {kind} prediction with {timesteps.__name__} timesteps, which IDDM "
                         "Train does not support: it trains eps or v_prediction models with discrete "
                         "timesteps (SD 1.x / 2.x; ModelSamplingDiscrete eps or v_prediction). Connect the "
                         "checkpoint's MODEL without a ModelSampling node that changes this.")
    if model.get_model_object("adm_channels"):
        raise ValueError("this MODEL needs extra conditioning (SDXL-style size / pooled-text "
                         "inputs), which IDDM Train does not provide yet; use an SD 1.x / 2.x "
                         "checkpoint.")
    return SUPPORTED_PREDICTIONS[prediction]


class LoRAWeight(nn.Module):
    """W -> W + (alpha / rank) * up @ down, applied by ComfyUI's cast ops on every forward. up and
    down are float32; the delta is computed in float32 (autocast off) and added in W's dtype."""

    def __init__(self, weight: Tensor, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        # The one initialisation both doors use (kohya's): down ~ Kaiming-uniform, up = 0.
        self.down = nn.Parameter(lora_io.kaiming_uniform_down(rank, in_features, generator).to(weight.device))
        self.up = nn.Parameter(torch.zeros(out_features, rank, device=weight.device))
        self.alpha = float(alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.down.shape[0]

    def __call__(self, weight: Tensor) -> Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            delta = (self.up @ self.down) * self.scale
        return weight + delta.to(weight.dtype)

    # ComfyUI moves weight functions with their module (model_patcher.move_weight_functions).
    def move_to(self, device=None) -> int:
        self.to(device=device)
        return sum(p.numel() * p.element_size() for p in self.parameters())


def kohya_name(module_path: str) -> str:
    """`diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q` ->
    `lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`."""
    return lora_io.kohya_name(module_path[len(UNET_PREFIX):])


class ComfyDenoiser:
    """Implements comfyui_iddm.ports.Denoiser. Build and use it inside `training_mode()`."""

    def __init__(self, model, clip, vae, *, rank: int, lora_alpha: float, seed: int,
                 mixed_precision: str = "auto", gradient_checkpointing: bool = False) -> None:
        import comfy.model_management as mm
        from comfyui_iddm.diffusion import NoiseSchedule
        from comfyui_iddm.precision import compute_dtype

        prediction_type = check_model(model)
        self.patcher = model.clone()
        self.base = self.patcher.model
        self.clip, self.vae = clip, vae
        self.device = mm.get_torch_device()
        self.compute_dtype = compute_dtype(mixed_precision, self.device, self.patcher.model_dtype())
        self.patcher.set_model_compute_dtype(self.compute_dtype)  # an object patch of our clone only

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
        self.vae_compute_dtype = torch.float32 if vae.vae_dtype == torch.float16 else vae.vae_dtype
        self._vae_casts = _cast_weights_to_input(vae.first_stage_model) \
            if self.vae_compute_dtype != vae.vae_dtype else []
        sampling = self.patcher.get_model_object("model_sampling")
        self._sigmas = sampling.sigmas.detach().float().to(self.device).clone()
        self._sample_sigmas = torch.cat([self._sigmas.flip(0), self._sigmas.new_zeros(1)])
        self._uuid = uuid.uuid4()
        self.schedule = NoiseSchedule.from_sigmas(self._sigmas, prediction_type)
        self._checkpointed: list[tuple[nn.Module, object]] = []
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()

    # -- text and VAE (in vae_compute_dtype) --------------------------------------------------------
    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        rows = []
        for prompt in prompts:
            with torch.no_grad():
                cond = self.clip.encode_from_tokens(self.clip.tokenize(prompt))
            rows.append(cond.detach().clone().float())
        return torch.cat(rows).to(self.device)

    def encode(self, images: Tensor) -> Tensor:
        vae = self.vae
        pixels = (images * 2.0 - 1.0).to(vae.device, self.vae_compute_dtype)
        latents = vae.first_stage_model.encode(pixels).float()
        return self.base.process_latent_in(latents.to(self.device))

    def decode(self, latents: Tensor) -> Tensor:
        vae = self.vae
        raw = self.base.process_latent_out(latents.float()).to(vae.device, self.vae_compute_dtype)
        return ((vae.first_stage_model.decode(raw).float() + 1.0) / 2.0).to(self.device)

    # -- diffusion --------------------------------------------------------------------------------
    def predict(self, z_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The raw UNet output, solved from apply_model's denoised latent (linear in it), float32."""
        from comfyui_iddm.precision import precision_autocast

        sigma = self._sigmas[t.to(self.device)]
        s = sigma.view(-1, *([1] * (z_t.ndim - 1)))
        x = z_t.float() * (1 + s ** 2).sqrt()  # ComfyUI's sampler space
        if cond.shape[0] != x.shape[0]:
            cond = cond.expand(x.shape[0], *cond.shape[1:])
        c = {"c_crossattn": cond, "transformer_options": self.transformer_options(sigma)}
        wrapper = self.patcher.model_options.get("model_function_wrapper")
        with precision_autocast(self.device, self.compute_dtype):
            if wrapper is not None:
                denoised = wrapper(self.base.apply_model, {"input": x, "timestep": sigma, "c": c,
                                                           "cond_or_uncond": [0]})
            else:
                denoised = self.base.apply_model(x, sigma, **c)
        denoised = denoised.float()
        if self.schedule.prediction_type == "epsilon":  # denoised = x - out * sigma
            return (x - denoised) / s
        # v: denoised = x / (sigma^2 + 1) - out * sigma / sqrt(sigma^2 + 1)
        return (x / (s ** 2 + 1) - denoised) * (s ** 2 + 1).sqrt() / s

    def transformer_options(self, sigma: Tensor) -> dict:
        """A fresh copy of the MODEL's transformer_options for one apply_model call, filled in the
        way ComfyUI's samplers fill it (comfy/sampler_helpers.py, comfy/samplers.py)."""
        import comfy.patcher_extension as pe

        options = pe.copy_nested_dicts(self.patcher.model_options.get("transformer_options", {}))
        pe.merge_nested_dicts(options.setdefault("wrappers", {}), self.patcher.wrappers, copy_dict1=False)
        pe.merge_nested_dicts(options.setdefault("callbacks", {}), self.patcher.callbacks, copy_dict1=False)
        options.update(cond_or_uncond=[0], uuids=[self._uuid], sigmas=sigma, sample_sigmas=self._sample_sigmas)
        return options

    # -- LoRA ---------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for adapter in self.lora.values() for p in (adapter.down, adapter.up)]

    def lora_state_dict(self) -> dict[str, Tensor]:
        state = {}
        for path, adapter in self.lora.items():
            name = kohya_name(path)
            state[name + lora_io.DOWN] = adapter.down.detach().to("cpu", torch.float32).clone()
            state[name + lora_io.UP] = adapter.up.detach().to("cpu", torch.float32).clone()
            state[name + lora_io.ALPHA] = torch.tensor(adapter.alpha)
        return state

    def load_lora_state_dict(self, state: dict[str, Tensor]) -> None:
        adapters = {kohya_name(path): adapter for path, adapter in self.lora.items()}
        matched = lora_io.match_lora(state, {name: (a.down.shape, a.up.shape) for name, a in adapters.items()},
                                     next(iter(adapters.values())).alpha)
        with torch.no_grad():
            for name, (down, up) in matched.items():
                adapters[name].down.copy_(down)
                adapters[name].up.copy_(up)

    # -- memory and clean-up ----------------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward instead of keeping them (less memory, ~30% more time):
        each layer of the UNet's blocks (resnet, transformer, resampling), and each block of the VAE
        encoder and decoder (the photo gradient's path). Applied to ComfyUI's shared modules until
        `release`."""
        for block in [*_unet_layers(self.base.diffusion_model), *_vae_blocks(self.vae.first_stage_model)]:
            if all(block is not done for done, _ in self._checkpointed):
                self._checkpointed.append((block, vars(block).get("forward", _ABSENT)))
                block.forward = functools.partial(_checkpointed_call, block.forward)

    def release(self) -> None:
        """Put back what training set on ComfyUI's shared modules: checkpointed forwards, the LoRA
        weight wrappers, the forced weight casting (UNet and VAE) and the object patches of our clone
        (compute dtype, the MODEL's model_sampling ...), so the user's other graphs see them as before."""
        for block, previous in reversed(self._checkpointed):
            _restore(block, "forward", previous)
        for module, previous in self._vae_casts:
            _restore(module, "comfy_cast_weights", previous)
        self._checkpointed, self._vae_casts = [], []
        adapters = set(map(id, self.lora.values()))
        for module in self.base.modules():
            functions = getattr(module, "weight_function", None)
            if functions:
                module.weight_function = [f for f in functions if id(f) not in adapters]
            if hasattr(module, "prev_comfy_cast_weights"):  # set by set_model_compute_dtype's forced cast
                module.comfy_cast_weights = module.prev_comfy_cast_weights
                del module.prev_comfy_cast_weights
        self.patcher.unpatch_model(unpatch_weights=False)  # object patches back to the originals


_ABSENT = object()  # an attribute the instance did not have (the class's applies)


def _restore(module: nn.Module, name: str, previous) -> None:
    if previous is _ABSENT:
        delattr(module, name)
    else:
        setattr(module, name, previous)


def _cast_weights_to_input(module: nn.Module) -> list[tuple[nn.Module, object]]:
    """Make ComfyUI's ops cast each layer's weights to its input's dtype (computing in that dtype
    whatever the stored one); returns what to restore."""
    changed = []
    for sub in module.modules():
        if hasattr(sub, "comfy_cast_weights"):
            changed.append((sub, vars(sub).get("comfy_cast_weights", _ABSENT)))
            sub.comfy_cast_weights = True
    return changed


def _unet_layers(unet: nn.Module) -> list[nn.Module]:
    """The layers inside the UNet's input, middle and output blocks. ComfyUI's UNet runs a block's
    layers itself (openaimodel.forward_timestep_embed), never the block's forward, so it is the
    layers that get checkpointed (as TrainLoraNode's find_all_highest_child_module_with_forward)."""
    blocks = [*getattr(unet, "input_blocks", []), getattr(unet, "middle_block", None),
              *getattr(unet, "output_blocks", [])]
    return [layer for block in blocks if block is not None
            for layer in (block if isinstance(block, nn.Sequential) else [block])]


def _vae_blocks(autoencoder: nn.Module) -> list[nn.Module]:
    """The resnet, attention and resampling blocks of ComfyUI's VAE encoder and decoder."""
    from comfy.ldm.modules.diffusionmodules.model import AttnBlock, Downsample, ResnetBlock, Upsample

    kinds = (ResnetBlock, AttnBlock, Downsample, Upsample)
    return [m for part in ("encoder", "decoder") if getattr(autoencoder, part, None) is not None
            for m in getattr(autoencoder, part).modules() if isinstance(m, kinds)]


def _checkpointed_call(forward, *args, **kwargs):
    """torch.utils.checkpoint around a layer's forward. Dict arguments (ComfyUI's transformer_options,
    which the UNet keeps updating as it runs) are copied at call time, so the recomputation in
    backward sees what the forward saw; what the layer writes into them still reaches the caller."""
    freeze = lambda values: [dict(v) if isinstance(v, dict) else v for v in values]  # noqa: E731
    at_call = freeze(args), dict(zip(kwargs, freeze(kwargs.values())))
    seen = []

    def run():
        call_args, call_kwargs = freeze(at_call[0]), dict(zip(at_call[1], freeze(at_call[1].values())))
        seen.append([*call_args, *call_kwargs.values()])
        return forward(*call_args, **call_kwargs)

    out = torch.utils.checkpoint.checkpoint(run, use_reentrant=False)
    for original, copy in zip([*args, *kwargs.values()], seen[0]):
        if isinstance(original, dict):
            original.update(copy)
    return out


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
