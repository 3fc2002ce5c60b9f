"""The Denoiser port on diffusers: UNet2DConditionModel + an image codec (AutoencoderKL, or tiny's
invertible pixel_unshuffle) + SD's training noise schedule + a prompt encoder; LoRA via peft.

Only the LoRA on the UNet attention projections trains; the UNet base, VAE and text encoder are
frozen, shared and never copied. `load_denoiser` builds one from `tiny`, a diffusers model folder
or a single-file SD1.x/SD2.x checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import Tensor

from .. import lora_io
from ..config import IDDMConfig
from ..diffusion import PREDICTION_TYPES, NoiseSchedule
from ..memory import use_gradient_checkpointing
from ..precision import compute_dtype, precision_autocast

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ADAPTER = "default"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


class ModelLoadError(ValueError):
    """The base model could not be loaded; the message says which input and what to do."""


class ImageCodec(Protocol):
    downscale: int  # latent side = image side / downscale

    def encode(self, images: Tensor) -> Tensor: ...
    def decode(self, latents: Tensor) -> Tensor: ...


class KLCodec:
    """SD's AutoencoderKL as a codec: [0,1] images <-> latents times the VAE's scaling factor.

    encode takes the posterior mean (deterministic, differentiable); decode does not clamp, so
    gradients reach every pixel."""

    def __init__(self, vae) -> None:
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)

    def encode(self, images: Tensor) -> Tensor:
        posterior = self.vae.encode(images * 2 - 1).latent_dist
        return posterior.mean * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        return (self.vae.decode(latents / self.scaling_factor).sample + 1) / 2


class CLIPPromptEncoder:
    """SD's text conditioning: CLIP tokenizer padded to its max length + the text encoder's last hidden
    state (SD2's configs already drop the last layer)."""

    def __init__(self, tokenizer, text_encoder) -> None:
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]


class DiffusersDenoiser:
    """Implements comfyui_iddm.ports.Denoiser.

    Precision: the frozen UNet and text encoder are stored in the compute dtype (half the memory
    in bf16/fp16), the VAE too except under fp16 (SD's VAE overflows in fp16, as diffusers' training
    examples note: it stays fp32); every forward pass runs under autocast and returns float32. The
    LoRA weights (and so the optimizer state) stay float32."""

    def __init__(self, unet: UNet2DConditionModel, codec: ImageCodec,
                 prompt_encoder: Callable[[Sequence[str]], Tensor], scheduler: DDPMScheduler,
                 config: IDDMConfig, *, device: str | torch.device = "cpu",
                 base_model_version: str | None = None) -> None:
        self.device = torch.device(device)
        self.config = config
        self.base_model_version = base_model_version
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(f"the model's scheduler predicts {prediction_type!r}; IDDM supports "
                                 f"{PREDICTION_TYPES}.")
        self.schedule = NoiseSchedule(scheduler.alphas_cumprod.to(self.device, torch.float32), prediction_type)
        self.compute_dtype = compute_dtype(config.mixed_precision, self.device)
        vae_dtype = torch.float32 if self.compute_dtype == torch.float16 else self.compute_dtype
        self.codec, self.prompt_encoder = codec, prompt_encoder
        for module, dtype in ((codec, vae_dtype), (getattr(codec, "vae", None), vae_dtype),
                              (getattr(prompt_encoder, "text_encoder", None), self.compute_dtype),
                              (prompt_encoder, None)):
            if isinstance(module, torch.nn.Module):
                torch.nn.Module.to(module.requires_grad_(False).eval(), self.device, dtype)
        # nn.Module.to: diffusers' own .to() warns about casting even when nothing must stay float32
        self.unet = self._with_lora(torch.nn.Module.to(unet, self.device, self.compute_dtype), config)
        if use_gradient_checkpointing(config.gradient_checkpointing, self.device):
            self.unet.enable_gradient_checkpointing()
            if hasattr(getattr(codec, "vae", None), "enable_gradient_checkpointing"):
                codec.vae.enable_gradient_checkpointing()

    @staticmethod
    def _with_lora(unet: UNet2DConditionModel, config: IDDMConfig) -> UNet2DConditionModel:
        """Freeze the UNet, add a float32 LoRA with the one seeded initialisation both doors use
        (lora_io.kaiming_uniform_down; up = 0), keep eval mode (no dropout) for determinism."""
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.lora_alpha,
                                    target_modules=LORA_TARGETS))
        _fresh_lora(unet, config)
        return unet.eval()

    # --- the Denoiser port ------------------------------------------------------------------
    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        with self._autocast():
            return self.prompt_encoder(list(prompts)).to(self.device, torch.float32)

    def encode(self, images: Tensor) -> Tensor:
        factor = self.codec.downscale
        if images.shape[-1] % factor or images.shape[-2] % factor:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {factor}; "
                             f"crop or resize the photos to a multiple of {factor} (e.g. --resolution 256).")
        with self._autocast():
            return self.codec.encode(images.to(self.device)).float()

    def decode(self, latents: Tensor) -> Tensor:
        with self._autocast():
            return self.codec.decode(latents).float()

    def predict(self, z_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if cond.shape[0] != z_t.shape[0]:
            cond = cond.expand(z_t.shape[0], *cond.shape[1:])
        with self._autocast():
            return self.unet(z_t, t.to(self.device), encoder_hidden_states=cond).sample.float()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name, p in self.unet.named_parameters() if ".lora_" in name]

    def lora_state_dict(self) -> dict[str, Tensor]:
        state = {}
        for path, module in lora_modules(self.unet).items():
            name = lora_io.kohya_name(path)
            state[name + lora_io.DOWN] = module.lora_A[ADAPTER].weight.detach().to("cpu", torch.float32).clone()
            state[name + lora_io.UP] = module.lora_B[ADAPTER].weight.detach().to("cpu", torch.float32).clone()
            state[name + lora_io.ALPHA] = torch.tensor(float(self.config.lora_alpha))
        return state

    @torch.no_grad()
    def load_lora_state_dict(self, state: dict[str, Tensor]) -> None:
        modules = {lora_io.kohya_name(path): m for path, m in lora_modules(self.unet).items()}
        matched = lora_io.match_lora(state, {name: (m.lora_A[ADAPTER].weight.shape, m.lora_B[ADAPTER].weight.shape)
                                             for name, m in modules.items()}, self.config.lora_alpha)
        for name, (down, up) in matched.items():
            modules[name].lora_A[ADAPTER].weight.copy_(down)
            modules[name].lora_B[ADAPTER].weight.copy_(up)

    # --- beyond the port: the UNet's own weights (ports.UNetWeights) ---------------------------
    def unet_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name.replace(".base_layer", ""): p for name, p in self.unet.named_parameters()
                if ".lora_" not in name}

    @torch.no_grad()
    def merge_lora(self) -> None:
        for module in lora_modules(self.unet).values():
            base = module.get_base_layer().weight
            delta = module.lora_B[ADAPTER].weight @ module.lora_A[ADAPTER].weight * module.scaling[ADAPTER]
            base += delta.to(base.dtype)
        _fresh_lora(self.unet, self.config)

    def _autocast(self):
        return precision_autocast(self.device, self.compute_dtype)


@torch.no_grad()
def _fresh_lora(unet: UNet2DConditionModel, config: IDDMConfig) -> None:
    """Every LoRA layer at the start of training: down seeded Kaiming-uniform, up = 0 (the base model)."""
    generator = torch.Generator().manual_seed(config.seed)
    for module in lora_modules(unet).values():
        down, up = module.lora_A[ADAPTER], module.lora_B[ADAPTER]
        down.weight.data = lora_io.kaiming_uniform_down(
            config.rank, down.in_features, generator).to(down.weight.device)
        up.weight.data = torch.zeros_like(up.weight, dtype=torch.float32)


def lora_modules(unet: UNet2DConditionModel) -> dict[str, LoraLayer]:
    """The UNet's LoRA layers by diffusers module path, in module order."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer)}


# --- loading ------------------------------------------------------------------------------------
def load_denoiser(base: str, config: IDDMConfig, *, device: str | torch.device = "cpu",
                  config_dir: str | None = None, prediction_type: str = "epsilon") -> DiffusersDenoiser:
    """base: "tiny" | a diffusers model folder | a single-file SD1.x/SD2.x checkpoint.

    config_dir: a local diffusers config folder for single files (offline); prediction_type only
    applies to `tiny` (real models take it from their scheduler config)."""
    if base == "tiny":
        from .tiny import build_tiny
        parts = build_tiny(prediction_type)
        return DiffusersDenoiser(parts.unet, parts.codec, parts.prompt_encoder, parts.scheduler, config,
                                 device=device, base_model_version=None)
    path = Path(base)
    if path.is_dir():
        return _load_folder(path, config, device)
    if path.is_file():
        return _load_single_file(path, config, device, config_dir)
    raise ModelLoadError(f"base model {base!r} is neither 'tiny', a diffusers model folder nor a "
                         "checkpoint file (it does not exist).")


def _load_folder(path: Path, config: IDDMConfig, device) -> DiffusersDenoiser:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    missing = [sub for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if not (path / sub).is_dir()]
    if missing:
        raise ModelLoadError(f"{path} is not a diffusers Stable Diffusion folder: it lacks {missing}; "
                             "expected unet/, vae/, text_encoder/, tokenizer/ and scheduler/.")
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"could not load the diffusers model in {path}: {error}") from error
    return _assemble(unet, vae, text_encoder, tokenizer, scheduler.config, config, device)


def _load_single_file(path: Path, config: IDDMConfig, device, config_dir: str | None) -> DiffusersDenoiser:
    from diffusers import StableDiffusionPipeline

    _check_sd_checkpoint(path)
    offline = config_dir is not None
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=config_dir, local_files_only=offline, safety_checker=None,
            requires_safety_checker=False)
    except Exception as error:  # diffusers raises many kinds (network, config, conversion)
        hint = ("check that --config-dir is a diffusers config folder of the same model family "
                "(unet/, vae/, text_encoder/, tokenizer/, scheduler/)" if offline else
                "offline, pass --config-dir with a local diffusers config folder of the same model "
                "family (e.g. a copy of stable-diffusion-v1-5 without weights)")
        raise ModelLoadError(f"could not load the checkpoint {path.name}: {error}; {hint}.") from error
    return _assemble(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler.config,
                     config, device)


def _check_sd_checkpoint(path: Path) -> None:
    """Refuse anything but an original-format SD UNet checkpoint before diffusers tries it, with a
    message naming the file (a LoRA, an embedding or a random file would fail obscurely)."""
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(f"{path.name} is not a checkpoint file; expected a Stable Diffusion 1.x/2.x "
                             f"single-file checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) or a diffusers folder.")
    try:
        keys = _checkpoint_keys(path)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"{path.name} could not be read as a checkpoint ({first_line}); expected a "
                             "Stable Diffusion 1.x/2.x .safetensors or .ckpt file of tensors only.") from None
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelLoadError(f"{path.name} is not a Stable Diffusion checkpoint (it has no "
                             "model.diffusion_model.* weights; is it a LoRA, VAE or embedding?); "
                             "expected a Stable Diffusion 1.x/2.x single-file checkpoint.")


def _checkpoint_keys(path: Path) -> list[str]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    # Never plain pickle: weights_only refuses arbitrary objects.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError("it holds no state dict")
    return list(state)


def _assemble(unet, vae, text_encoder, tokenizer, scheduler_config, config: IDDMConfig,
              device) -> DiffusersDenoiser:
    scheduler = DDPMScheduler.from_config(scheduler_config)
    return DiffusersDenoiser(unet, KLCodec(vae), CLIPPromptEncoder(tokenizer, text_encoder), scheduler,
                             config, device=device,
                             base_model_version=_base_model_version(unet, scheduler))


def _base_model_version(unet, scheduler) -> str | None:
    """kohya's ss_base_model_version vocabulary: sd_v1, sd_v2, sd_v2_768_v."""
    dim = unet.config.cross_attention_dim
    if dim == 768:
        return "sd_v1"
    if dim == 1024:
        return "sd_v2_768_v" if scheduler.config.prediction_type == "v_prediction" else "sd_v2"
    return None
