"""IDDM Train Protected LoRA: Algorithm 1 on ComfyUI's own MODEL / CLIP / VAE."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from . import spec
from .convert import IddmLora, comfy_to_engine, engine_to_comfy, figures_json
from .served import comfy_relative_errors
from .places import OPTION_SOURCES, recognizer_dir
from .schema import build_schema
from .train_options import TrainOptions, own_inputs, train_settings


class IDDMTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(spec.TRAIN, OPTION_SOURCES)

    @classmethod
    @comfy_relative_errors
    def execute(cls, model, clip, vae, reference, protection, lora_name: str, resume: bool = False,
                options=None, class_images=None, **knobs) -> io.NodeOutput:
        from comfyui_iddm.config import IDDMConfig
        from comfyui_iddm.iddm import total_steps
        from comfyui_iddm.lora_io import save_lora
        from comfyui_iddm.pipeline import train_on_photos

        from .comfy_denoiser import ComfyDenoiser, check_model, training_mode
        from .lora_output import LoraOutput, engine_run
        from .photo_nodes import load_face_detector
        from .progress import ComfyProgress, cancel_requested
        settings = {**train_settings(options, own_inputs(cls.hidden.prompt, cls.hidden.unique_id)), **knobs}
        overwrite, face_detector = settings["overwrite"], settings["face_detector"]
        check_model(model)  # an unsupported MODEL is refused before any work starts
        output = LoraOutput.claim(lora_name, resume, overwrite)  # refused before any work starts
        ref, prot = comfy_to_engine(reference), comfy_to_engine(protection)
        resolution = _square_side(ref, "reference", _square_side(prot, "protection"))
        config = IDDMConfig(resolution=resolution, **{k: v for k, v in settings.items()
                                                      if k in spec.train_config_names()})
        from comfyui_iddm.class_images import NODE_HINTS, check_prior_preservation
        check_prior_preservation(config.prior_weight, class_images is not None, NODE_HINTS)  # before any work
        with training_mode():
            detector = load_face_detector(face_detector)
            reference_set = face_crops(ref, detector, "reference")
            protection_set = face_crops(prot, detector, "protection")
            classes = comfy_to_engine(class_images) if class_images is not None else None
            denoiser = ComfyDenoiser(model, clip, vae, rank=config.rank, lora_alpha=config.lora_alpha,
                                     seed=config.seed, mixed_precision=config.mixed_precision,
                                     gradient_checkpointing=config.gradient_checkpointing)
            logging.info(f"[IDDM] training {output.file_name}: {config.iterations} iteration(s), "
                         f"{total_steps(config)} steps, {len(reference_set)} reference + "
                         f"{len(protection_set)} protection photos at {resolution} px; "
                         f"{denoiser.schedule.prediction_type} model computing in "
                         f"{_dtype_name(denoiser.compute_dtype)}, its VAE in {_dtype_name(denoiser.vae_compute_dtype)}")
            with engine_run(denoiser):
                result = train_on_photos(
                    denoiser, reference_set, protection_set, config, weights_dir=recognizer_dir(),
                    class_images=classes, on_progress=ComfyProgress(cls.hidden.unique_id, total_steps(config)),
                    should_cancel=cancel_requested, state_dir=output.state_dir)
        save_lora(output.path, result.lora, result.metadata, overwrite=overwrite)
        output.saved()
        logging.info(f"[IDDM] saved protected LoRA {output.file_name} ({result.report.get('seconds_total')} s)")
        lora = IddmLora(output.file_name, result.lora, result.metadata)
        return io.NodeOutput(lora, output.file_name, engine_to_comfy(result.decoupled), figures_json(result.report),
                             ui={"iddm_train": [chart_figures(result.report)]})


def chart_figures(report: dict) -> dict:
    """What the web chart draws when the run ends (and after a reload): figures only."""
    return {"iterations": [{k: record.get(k, []) for k in ("stage1_loss", "stage2_score", "ft_loss")}
                           for record in report.get("iterations", [])],
            "decoupled": report.get("decoupled", {}), "identity": report.get("identity", []),
            "seconds_total": report.get("seconds_total")}


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _square_side(images, which: str, expected: int | None = None) -> int:
    height, width = images.shape[-2:]
    if height != width or height % 8:
        raise ValueError(f"the {which} images are {width}x{height}; IDDM Train needs square face crops "
                         "whose side is a multiple of 8. Load them with IDDM Load Private Photos.")
    if expected is not None and height != expected:
        raise ValueError(f"reference images are {height} px but protection images are {expected} px; "
                         "give both sets the same resolution.")
    return int(height)


def face_crops(images, detector, which: str):
    """The crops as a PhotoSet with their landmarks. They are already face crops (IDDM Load Private
    Photos checked face size on the originals), so they are not cropped again."""
    import torch
    from comfyui_iddm.faces.detect import landmarks_tensor
    from comfyui_iddm.photos import PhotoSet, centred_face

    count, side = images.shape[0], images.shape[-1]
    if detector is None:
        landmarks = torch.as_tensor(centred_face((side, side)).landmarks, dtype=torch.float32).expand(count, 5, 2)
    else:
        try:
            landmarks = landmarks_tensor(detector.detect(images))
        except ValueError as error:
            raise ValueError(f"{which} photos: {error} Remove those photos, or set face_detector to "
                             "'none' if they are face-centred crops.") from None
    return PhotoSet(images, landmarks.clone(), [f"{which} {i}" for i in range(count)])


class IDDMTrainOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(spec.TRAIN_OPTIONS, OPTION_SOURCES)

    @classmethod
    @comfy_relative_errors
    def execute(cls, **values) -> io.NodeOutput:
        return io.NodeOutput(TrainOptions(values))


NODES = [IDDMTrain, IDDMTrainOptions]
