"""IDDM Cloak Photos: a cloak (comfyui_iddm/cloak.py) on ComfyUI's own MODEL / CLIP / VAE, or a RID network
from models/iddm_rid."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from . import spec
from .places import OPTION_SOURCES, rid_network_path
from .schema import build_schema
from .served import comfy_relative_errors


class IDDMCloakPhotos(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(spec.CLOAK, OPTION_SOURCES)

    @classmethod
    @comfy_relative_errors
    def execute(cls, images, method: str, model=None, clip=None, vae=None, rid_weights: str | None = None,
                **knobs) -> io.NodeOutput:
        from comfyui_iddm.aspl import total_steps
        from comfyui_iddm.cloak import CloakRequest, cloak_config, make_cloak, run_cloak
        from comfyui_iddm.config import ConfigError
        from comfyui_iddm.iddm import Cancelled

        from .comfy_denoiser import ComfyDenoiser, check_model, training_mode
        from .convert import cloak_report, comfy_to_engine, engine_to_comfy, rid_network_name
        from .progress import ComfyProgress, cancel_requested, raise_if_interrupted

        network = rid_network_name(method, rid_weights)  # rid without a network: refused before any work
        network_path = rid_network_path(network) if network else None
        photos = comfy_to_engine(images)
        config = cloak_config(resolution=square_side(photos), **knobs)
        if method == "aspl":
            if model is None or clip is None or vae is None:
                raise ConfigError("method aspl needs the model it protects against: connect MODEL, CLIP and "
                                  "VAE from Load Checkpoint (or choose noise).")
            check_model(model)  # an unsupported MODEL is refused before any work starts
        made = []

        def denoiser():
            if not made:
                made.append(ComfyDenoiser(model, clip, vae, rank=config.rank, lora_alpha=config.lora_alpha,
                                          seed=config.seed, mixed_precision=config.mixed_precision,
                                          gradient_checkpointing=config.gradient_checkpointing))
            return made[0]

        steps = total_steps(config) if method == "aspl" else 1
        logging.info(f"[IDDM] cloaking {photos.shape[0]} photo(s) at {photos.shape[-1]} px with {method}")
        with training_mode():
            cloak = make_cloak(CloakRequest(method, config, denoiser=denoiser, rid_weights=network_path,
                                            on_progress=ComfyProgress(cls.hidden.unique_id, steps),
                                            should_cancel=cancel_requested))
            try:
                outcome = run_cloak(cloak, photos)
            except Cancelled:
                raise_if_interrupted()
                raise
            finally:
                for made_denoiser in made:
                    made_denoiser.release()
        return io.NodeOutput(engine_to_comfy(outcome.cloaked), cloak_report(method, config, outcome))


def square_side(photos) -> int:
    height, width = photos.shape[-2:]
    if height != width or height % 8:
        raise ValueError(f"the photos are {width}x{height}; IDDM Cloak Photos needs square face crops whose "
                         "side is a multiple of 8. Load them with IDDM Load Private Photos.")
    return int(height)


NODES = [IDDMCloakPhotos]
