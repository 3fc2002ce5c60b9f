"""Resumable state of a run, saved after every finished iteration to a private working folder.

Each save goes to a fresh sub-folder that is renamed into place only when complete, so an
interrupt during a save never corrupts the last good state. The folder holds X' (derived from
the private photos): it belongs beside the user's own output, never in a shared output/temp
folder, and the caller deletes it after a successful run.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from .atomic import OutputWriteError
from .config import IDDMConfig

_PREFIX = "iteration-"


class StateMismatchError(ValueError):
    pass


class StateExistsError(FileExistsError):
    pass


@dataclass
class RunState:
    iteration: int  # last finished k
    lora: dict[str, Tensor]
    optimizer: dict[str, Any]
    generator_state: Tensor
    decoupled: Tensor
    history: list[dict]
    seconds: float


def private_run_dir(run_name: str) -> Path:
    """Where a run named after its output (e.g. the LoRA file name) keeps its resumable state when
    there is no user-chosen output folder to put it beside: the user's own cache, never a folder a
    server shares (ComfyUI's output/, temp/ or user/ are all served over HTTP)."""
    from .faces.weights import user_cache_dir
    if not run_name or "/" in run_name or "\\" in run_name or run_name.startswith("."):
        raise ValueError(f"run name {run_name!r} is not a plain file name.")
    return user_cache_dir().parent / "runs" / run_name


def claim_state_dir(state_dir: Path, resume: bool, start_over: bool, what: str, how: str) -> Path:
    """A leftover state folder (a cancelled or crashed run) is continued with resume, discarded
    when the user asked to start over, and otherwise refused, never silently lost."""
    state_dir = Path(state_dir)
    if state_dir.exists() and not resume:
        if not start_over:
            raise StateExistsError(f"an unfinished run for {what} was found (cancelled or crashed); {how}")
        shutil.rmtree(state_dir)
    return state_dir


def state_dir_beside(output: Path) -> Path:
    """The private working folder of a resumable run, beside the file the user asked for."""
    return output.with_name(f".{output.name}.iddm-state")


def prepare_state_dir(state_dir: Path, resume: bool, what: str) -> Path:
    """Before any work: a folder left by a run stopped before its first iteration is removed (nothing
    to keep); --resume with nothing saved, and a saved run without --resume, are refused."""
    state_dir = Path(state_dir)
    if state_dir.exists() and not has_saved_state(state_dir):
        shutil.rmtree(state_dir)
    if resume and not has_saved_state(state_dir):
        raise FileNotFoundError(
            f"--resume: no interrupted run of {what} to continue (nothing saved in {state_dir}). Run the "
            "same command without --resume to start from the beginning.")
    return claim_state_dir(state_dir, resume, False, what,
                           f"continue it with --resume, or delete {state_dir} to start over.")


def has_saved_state(state_dir: Path) -> bool:
    """Whether a finished iteration was saved there (what a resume continues from)."""
    state_dir = Path(state_dir)
    return state_dir.is_dir() and bool(_finished(state_dir))


def save_state(state_dir: Path, config: IDDMConfig, state: RunState) -> None:
    tensors = {f"lora.{k}": v for k, v in state.lora.items()}
    tensors["decoupled"] = state.decoupled
    tensors["generator_state"] = state.generator_state
    save_iteration(state_dir, state.iteration, tensors, state.optimizer,
                   {"history": state.history, "seconds": state.seconds, "config": config.to_dict()})


def load_latest_state(state_dir: Path, config: IDDMConfig, original: Tensor) -> RunState | None:
    """The last finished iteration's state, or None when there is nothing to resume.

    `original` is X0 of this run: a saved X' farther than eta from it was made from other photos
    (the check needs no fingerprint of the photos, which must never be stored)."""
    saved = load_last_iteration(state_dir, config.to_dict())
    if saved is None:
        return None
    decoupled = saved.tensors["decoupled"]
    if decoupled.shape != original.shape or float((decoupled - original).abs().max()) > config.eta + 1e-5:
        raise StateMismatchError(f"the saved run in {state_dir} was made from other photos; resume with the "
                                 "same photos, or delete that folder to start over.")
    return RunState(saved.iteration, {k[5:]: v for k, v in saved.tensors.items() if k.startswith("lora.")},
                    saved.optimizer, saved.tensors["generator_state"], decoupled, saved.meta["history"],
                    saved.meta["seconds"])


@dataclass
class SavedIteration:
    iteration: int
    tensors: dict[str, Tensor]
    optimizer: dict[str, Any]
    meta: dict[str, Any]  # JSON: "config" (the run's settings) and whatever the run keeps


def save_iteration(state_dir: Path, iteration: int, tensors: dict[str, Tensor], optimizer: dict[str, Any],
                   meta: dict[str, Any]) -> None:
    """Saves one finished iteration (tensors, optimizer state, JSON meta with the run's "config") into
    a fresh sub-folder renamed into place when complete; older ones are then removed."""
    state_dir, staging = Path(state_dir), None
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=state_dir))
        # Not .safetensors: ComfyUI's LoRA lists would otherwise show these files. Serialized in
        # memory and written by Python, so a full disk raises OSError (save_file's error is not one).
        (staging / "tensors.bin").write_bytes(save({k: v.contiguous() for k, v in tensors.items()}))
        buffer = io.BytesIO()
        torch.save(optimizer, buffer)
        (staging / "optimizer.pt").write_bytes(buffer.getvalue())
        (staging / "state.json").write_text(json.dumps({"iteration": iteration, **meta}))
        os.replace(staging, state_dir / f"{_PREFIX}{iteration:04d}")
    except BaseException as err:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):
            raise OutputWriteError(f"could not save the resumable state in {state_dir} ({err.strerror or err}); "
                                   "free some disk space, then rerun the same command with --resume (the last "
                                   "saved iteration is kept).") from err
        raise
    for old in _finished(state_dir)[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def load_last_iteration(state_dir: Path, config: dict[str, Any]) -> SavedIteration | None:
    """The last finished iteration, or None; saved with other settings than `config` is refused."""
    finished = _finished(Path(state_dir)) if Path(state_dir).is_dir() else []
    if not finished:
        return None
    folder = finished[-1]
    meta = json.loads((folder / "state.json").read_text())
    if meta["config"] != config:
        changed = sorted(k for k, v in config.items() if meta["config"].get(k) != v)
        raise StateMismatchError(f"the saved run in {state_dir} used different settings ({', '.join(changed)}); "
                                 "resume with the same settings, or delete that folder to start over.")
    return SavedIteration(meta.pop("iteration"), load_file(str(folder / "tensors.bin")),
                          torch.load(folder / "optimizer.pt", weights_only=True), meta)


def _finished(state_dir: Path) -> list[Path]:
    return sorted(p for p in state_dir.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))
