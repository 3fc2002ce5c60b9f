"""What the training nodes share around an engine run: the LoRA's place in models/loras and its
resumable state (claimed before any work), Cancel turned into ComfyUI's interruption, the model door
released, and the new file listed at once."""
from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class LoraOutput:
    file_name: str  # inside models/loras
    path: Path
    state_dir: Path  # the private folder of the run's finished iterations

    @classmethod
    def claim(cls, name: str, resume: bool, overwrite: bool) -> "LoraOutput":
        """Refuses before any work: a name with folders, a taken name (without overwrite), a leftover
        unfinished run (without resume or overwrite)."""
        from comfyui_iddm.atomic import check_writable
        from comfyui_iddm.private_root import neutral_lora_name
        from comfyui_iddm.run_state import claim_state_dir, private_run_dir

        from .convert import lora_file_name
        from .places import loras_dir

        file_name = lora_file_name(name or neutral_lora_name())
        # ComfyUI's checkout ships models/loras; a bare --base-directory lacks it until something makes it
        folder = loras_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / file_name
        check_writable(path, overwrite)
        state_dir = claim_state_dir(private_run_dir(file_name), resume, overwrite, file_name,
                                    "turn on resume to continue it, or overwrite to start over.")
        return cls(file_name, path, state_dir)

    def saved(self) -> None:
        """After the file is written: the run's state goes, and stock loaders list the file at once."""
        import folder_paths

        shutil.rmtree(self.state_dir, ignore_errors=True)
        folder_paths.filename_list_cache.pop("loras", None)


@contextlib.contextmanager
def engine_run(denoiser) -> Iterator[None]:
    """The engine's Cancelled becomes ComfyUI's own interruption; the model door is always released."""
    from comfyui_iddm.iddm import Cancelled

    from .progress import raise_if_interrupted

    try:
        yield
    except Cancelled:
        raise_if_interrupted()
        raise
    finally:
        denoiser.release()
