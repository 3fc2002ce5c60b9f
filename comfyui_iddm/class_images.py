"""DreamBooth's prior preservation inputs: class images, from a folder or generated once into it.

As diffusers' DreamBooth example does: when the class folder holds fewer than the images asked for,
the rest are generated with the base model and the class prompt (sampling.py) and saved there, so
the next run reuses them. Generated image i always comes from the same seed (run seed, i), so
topping a folder up gives the images a single run would have made. Class images are not the person's
photos, but reports and metadata still record only their count, never the folder or file names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import atomic
from .config import ConfigError, IDDMConfig
from .photos import IMAGE_SUFFIXES, UnreadablePhoto, pil_to_tensor, read_image, tensor_to_pil
from .ports import Denoiser


@dataclass(frozen=True)
class PriorHints:
    """How a door lets the user give class images or set their weight (for the error messages)."""
    add_images: str = "pass class images (class_images)"
    set_weight: str = "set prior_weight above 0 (1.0 is DreamBooth's usual weight)"
    drop_images: str = "leave the class images out"


CLI_HINTS = PriorHints(
    add_images="give --class-dir DIR holding class images (e.g. photos of other people for the class "
               "prompt), or --class-dir DIR --num-class-images N to generate N of them with the base model",
    set_weight="set --prior-weight above 0 (1.0 is DreamBooth's usual weight)",
    drop_images="drop --class-dir")
NODE_HINTS = PriorHints(
    add_images="connect images of the class (e.g. generated with the class prompt) to class_images",
    set_weight="set prior_weight above 0 on IDDM Train Options (1.0 is DreamBooth's usual weight)",
    drop_images="disconnect class_images")


def check_prior_preservation(prior_weight: float, has_class_images: bool,
                             hints: PriorHints = PriorHints()) -> None:
    """Prior preservation needs both a weight and class images; either one alone would be silently
    ignored, so it is refused before any training."""
    if prior_weight > 0 and not has_class_images:
        raise ConfigError(f"prior_weight={prior_weight:g} asks for prior preservation but no class "
                          f"images were given; {hints.add_images}, or set the weight to 0 (no prior "
                          "preservation).")
    if prior_weight == 0 and has_class_images:
        raise ConfigError(f"class images were given but prior_weight is 0, so they would be ignored; "
                          f"{hints.set_weight}, or {hints.drop_images}.")


def fit_class_images(images: Tensor, resolution: int) -> Tensor:
    """Class images [N,3,H,W] in [0,1] -> centre square crops at the training resolution (as
    diffusers' DreamBooth example: resize, centre crop)."""
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = images[..., top:top + side, left:left + side].float()
    if side == resolution:
        return square
    return F.interpolate(square, size=(resolution, resolution), mode="bilinear", antialias=True,
                         align_corners=False).clamp(0, 1)


def class_image_files(folder: Path) -> list[Path]:
    """The image files of a class folder, sorted (hidden files and other files ignored)."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class ClassImagePlan:
    """What a run will use: the folder, how many images it takes, how many must be generated first."""
    folder: Path
    count: int  # images used
    to_generate: int  # of them, made with the base model before training

    @classmethod
    def check(cls, folder: Path | None, num_class_images: int | None, config: IDDMConfig,
              hints: PriorHints = CLI_HINTS, needed_by: str | None = None) -> "ClassImagePlan | None":
        """Every refusal before any work: weight without images and images without weight, a
        missing or empty folder with nothing to generate, an unwritable folder to generate into.
        needed_by: what else uses the class images (then they are required, whatever the weight)."""
        if num_class_images is not None and folder is None:
            raise ConfigError("--num-class-images needs --class-dir DIR: the folder the class images are "
                              "generated into once and reused by later runs.")
        if num_class_images is not None and num_class_images < 1:
            raise ConfigError(f"--num-class-images {num_class_images} is not a positive count; "
                              "DreamBooth's example uses 100-200.")
        if needed_by is None:
            check_prior_preservation(config.prior_weight, folder is not None, hints)
        elif folder is None:
            raise ConfigError(f"{needed_by} needs class images (other people of the class): give --class-dir "
                              "DIR, with --num-class-images N to generate missing ones with the base model.")
        if folder is None:
            return None
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--class-dir {folder} is a file, not a folder.")
        present = len(class_image_files(folder)) if folder.is_dir() else 0
        if num_class_images is None:
            if present == 0:
                raise ConfigError(f"--class-dir {folder} holds no images; put class images there, or add "
                                  "--num-class-images N to generate N of them with the base model.")
            return cls(folder, present, 0)
        to_generate = max(0, num_class_images - present)
        if to_generate:
            nearest = next(p for p in (folder, *folder.parents) if p.exists())
            atomic.check_folder_writable(nearest, "generated class images")
        return cls(folder, num_class_images, to_generate)

    def prepare(self, denoiser: Denoiser, config: IDDMConfig,
                log: Callable[[str], None] = lambda message: None, **sampling) -> Tensor:
        """Generates the missing images into the folder (base model, class prompt, run seed), then
        returns the first `count` images as centre crops at the training resolution."""
        if self.to_generate:
            from .sampling import generate_images

            self.folder.mkdir(parents=True, exist_ok=True)
            first = len(class_image_files(self.folder))
            log(f"generating {self.to_generate} class image(s) for {config.class_prompt!r} with the base "
                f"model (once; later runs reuse them)")
            for index in range(first, first + self.to_generate):
                image = generate_images(denoiser, config.class_prompt, [index], config.resolution,
                                        config.seed, **sampling)[0]
                path = _free_name(self.folder, index)
                atomic.write_with(path, lambda tmp, img=image: tensor_to_pil(img).save(tmp, format="PNG"))
        images = []
        for path in class_image_files(self.folder)[:self.count]:
            try:
                images.append(fit_class_images(pil_to_tensor(read_image(path))[None], config.resolution))
            except UnreadablePhoto as err:
                log(f"class image {err}: skipped")
        if not images:
            raise ConfigError(f"no readable class image in {self.folder}; replace them, or empty the "
                              "folder and let --num-class-images generate new ones.")
        return torch.cat(images)


def _free_name(folder: Path, index: int) -> Path:
    """class_<index>.png, or the next free index if a file of that name is already there."""
    while (folder / f"class_{index:05d}.png").exists():
        index += 1
    return folder / f"class_{index:05d}.png"
