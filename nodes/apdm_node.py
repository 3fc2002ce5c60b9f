"""IDDM Anti-Personalize Model: APDM (comfyui_iddm/apdm.py) on ComfyUI's own MODEL / CLIP / VAE, its
protection a LoRA saved into models/loras as IDDM Train saves its LoRA."""
from __future__ import annotations

import json
import logging

from comfy_api.latest import io

from . import spec
from .places import OPTION_SOURCES
from .schema import build_schema
from .served import comfy_relative_errors


class IDDMAntiPersonalizeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(spec.ANTI_PERSONALIZE, OPTION_SOURCES)

    @classmethod
    @comfy_relative_errors
    def execute(cls, model, clip, vae, subject, class_images, protection_name: str, resume: bool = False,
                overwrite: bool = False, **knobs) -> io.NodeOutput:
        import comfy.sd
        from comfyui_iddm.apdm import LORA_PROTECTION, APDMConfig, run_apdm, total_steps
        from comfyui_iddm.apdm_weights import save_protection
        from comfyui_iddm.class_images import fit_class_images

        from .cloak_node import square_side
        from .comfy_denoiser import ComfyDenoiser, check_model, training_mode
        from .convert import comfy_to_engine
        from .lora_output import LoraOutput, engine_run
        from .progress import ComfyProgress, cancel_requested

        check_model(model)  # everything that can be refused is refused before any work starts
        photos = comfy_to_engine(subject)
        config = APDMConfig(**{**LORA_PROTECTION, **knobs, "resolution": square_side(photos)})
        output = LoraOutput.claim(protection_name, resume, overwrite)
        with training_mode():
            others = fit_class_images(comfy_to_engine(class_images), config.resolution)
            denoiser = ComfyDenoiser(model, clip, vae, rank=config.rank, lora_alpha=config.lora_alpha,
                                     seed=config.seed, mixed_precision=config.mixed_precision,
                                     gradient_checkpointing=config.gradient_checkpointing)
            logging.info(f"[IDDM] anti-personalizing into {output.file_name}: {config.iterations} iteration(s) of "
                         f"{config.ft_steps} step(s), {photos.shape[0]} photo(s) at {config.resolution} px, "
                         f"{others.shape[0]} class image(s)")
            with engine_run(denoiser):
                result = run_apdm(denoiser, photos, config, class_images=others,
                                  on_progress=ComfyProgress(cls.hidden.unique_id, total_steps(config)),
                                  should_cancel=cancel_requested, state_dir=output.state_dir)
        save_protection(output.path, result, config, overwrite=overwrite)
        output.saved()
        logging.info(f"[IDDM] saved protection LoRA {output.file_name} ({result.seconds_total:.0f} s)")
        protected, _ = comfy.sd.load_lora_for_models(model, None, result.weights, 1.0, 0.0)
        report = json.dumps({"settings": config.to_dict(), "figures": result.figures,
                             "seconds": round(result.seconds_total, 1)}, indent=1, sort_keys=True)
        return io.NodeOutput(protected, output.file_name, report)


NODES = [IDDMAntiPersonalizeModel]
