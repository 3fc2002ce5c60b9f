"""The ComfyUI door in half precision against float32, under ComfyUI started with its storage flags.

usage (under ComfyUI's Python, ComfyUI on sys.path):
    half_precision_check.py CHECKPOINT PHOTOS MIXED_PRECISION OUT [REFERENCE] [-- COMFYUI FLAGS...]
Starts ComfyUI with FLAGS (e.g. --fp16-unet --bf16-vae), loads CHECKPOINT with its loader (so the UNet
and VAE are stored as those flags say), builds nodes/comfy_denoiser.py with MIXED_PRECISION, gives it
a fixed non-zero LoRA, and measures one fine-tune step and one PGD step of each stage
(comfyui_iddm.precision_check.step_figures) on the face photos in PHOTOS (MTCNN landmarks, dlib's
recognizer as the Stage II surrogate), plus the gradient of a fixed linear read-out of Stage II's
x0_hat (the door's part of Stage II without the recognizer). Saves the figures to OUT; with REFERENCE
(the OUT of a float32 run) adds precision_check.compare(reference, these), the read-out cosine and
the share of Stage II gradient signs that agree. Also reports the dtypes ComfyUI chose and what
`release` left on the shared modules. Prints one JSON line.
"""
from __future__ import annotations

import dataclasses

from comfy_process import emit, load_checkpoint, load_pack, seeded_lora, shared_state, start_comfyui

ARGS = start_comfyui()
import torch  # noqa: E402

from comfyui_iddm.faces.detect import load_detector  # noqa: E402
from comfyui_iddm.faces.ensemble import IdentityEnsemble  # noqa: E402
from comfyui_iddm.faces.registry import load_recognizers  # noqa: E402
from comfyui_iddm.iddm import frozen  # noqa: E402
from comfyui_iddm.losses import NoiseDraw, denoised_prediction  # noqa: E402
from comfyui_iddm.photos import load_photo_folder  # noqa: E402
from comfyui_iddm.precision_check import StepFigures, compare, step_figures  # noqa: E402

REFERENCE_PHOTOS = 3  # the rest are the protection photos
TAU = 0.03


def dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def main(checkpoint: str, photos_dir: str, mixed_precision: str, out: str, reference: str | None = None) -> dict:
    comfy_denoiser = load_pack()
    model, clip, vae = load_checkpoint(checkpoint)
    photos = load_photo_folder(photos_dir, 64, load_detector("mtcnn"))
    ref, prot = photos.images[:REFERENCE_PHOTOS], photos.images[REFERENCE_PHOTOS:]
    ref_landmarks, prot_landmarks = photos.landmarks[:REFERENCE_PHOTOS], photos.landmarks[REFERENCE_PHOTOS:]
    result = {"stored": {"unet": dtype_name(model.model_dtype()), "vae": dtype_name(vae.vae_dtype),
                         "comfyui_manual_cast": dtype_name(model.model.manual_cast_dtype)}}
    before = shared_state(model, vae)
    with comfy_denoiser.training_mode():
        denoiser = comfy_denoiser.ComfyDenoiser(model, clip, vae, rank=4, lora_alpha=4.0, seed=0,
                                                mixed_precision=mixed_precision)
        denoiser.load_lora_state_dict(seeded_lora(denoiser, seed=2, std=0.02))
        result["compute"] = dtype_name(denoiser.compute_dtype)
        result["vae_compute"] = dtype_name(denoiser.vae_compute_dtype)
        result["applied_manual_cast"] = dtype_name(model.model.manual_cast_dtype)
        scorer = IdentityEnsemble.from_reference(load_recognizers(["dlib_resnet"]), ref, ref_landmarks, TAU)
        cond = denoiser.encode_prompt(["a photo of sks person"])
        figures = step_figures(denoiser, prot, prot_landmarks, scorer, cond, seed=1)
        readout = readout_gradient(denoiser, prot, cond)
        denoiser.release()
    result["released"] = {"before": before, "after": shared_state(model, vae, denoiser)}
    torch.save({**dataclasses.asdict(figures), "readout": readout}, out)
    if reference is not None:
        saved = torch.load(reference, weights_only=True)
        float32_readout = saved.pop("readout")
        float32 = StepFigures(**saved)
        result["agreement"] = compare(float32, figures).as_dict()
        result["stage2_readout_cosine"] = cosine(readout, float32_readout)
        result["stage2_sign_agreement"] = round(float((figures.stage2_grad.sign() == float32.stage2_grad.sign())
                                                      .double().mean()), 6)
    return result


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)), 6)


def readout_gradient(denoiser, photos: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """d/dX' of a fixed linear read-out of x0_hat = decode(predict_x0(encode(X'))): Stage II's path
    through the door (VAE encoder, UNet, VAE decoder) without the face recognizer, whose own input
    gradient (ReLU network) changes with any small change of its input."""
    generator = torch.Generator().manual_seed(7)
    x = photos.clone().to(denoiser.device).requires_grad_(True)
    with frozen(denoiser.trainable_parameters()):
        z0 = denoiser.encode(x)
        draw = NoiseDraw(torch.randn(z0.shape, generator=generator).to(denoiser.device),
                         torch.full((x.shape[0],), 100, device=denoiser.device))
        readout = torch.randn(x.shape, generator=generator).to(denoiser.device)
        (denoised_prediction(denoiser, z0, cond, draw) * readout).mean().backward()
    return x.grad.float().cpu()


if __name__ == "__main__":
    emit(main(*ARGS))
