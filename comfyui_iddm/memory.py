"""How many photos go through one PGD forward/backward (`pgd_batch`), when gradient checkpointing is
needed, and what happens when a GPU runs out of memory.

On a CPU, `auto` (0) takes every photo at once. On CUDA, `auto` measures instead of guessing: the
first step runs one photo at a time, and the peak memory it added per photo sets the chunk for the
rest of the run (80% of the memory then free). Whatever the size, an out-of-memory error in a step
halves the chunk and runs the step again, once, with a warning; chunking is exact, so the result is
the same.
"""
from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch

T = TypeVar("T")
FREE_MEMORY_SHARE = 0.8
# At or below this much GPU memory, gradient checkpointing is on whatever the setting says: SD 1.5 at
# 512 px without it needs more than such a card has (benchmarks/bench_real_size.py; README's table).
CHECKPOINTING_CARD_GIB = 12.5

log = logging.getLogger("comfyui_iddm")


def use_gradient_checkpointing(requested: bool, device: torch.device) -> bool:
    """The setting, turned on by itself on GPUs of CHECKPOINTING_CARD_GIB or less."""
    if requested or device.type != "cuda":
        return requested
    total = torch.cuda.get_device_properties(device).total_memory
    if total <= CHECKPOINTING_CARD_GIB * 2**30:
        log.info(f"[IDDM] {total / 2**30:.0f} GiB GPU: gradient checkpointing on (needed to fit)")
        return True
    return False


class PhotoChunks:
    def __init__(self, requested: int, photos: int, device: torch.device) -> None:
        self.photos, self.device = photos, device
        self.measuring = requested == 0 and device.type == "cuda"
        self.size = 1 if self.measuring else min(requested or photos, photos)

    def run(self, step: Callable[[int], T]) -> T:
        """step(chunk) computes one PGD step's gradient `chunk` photos at a time."""
        try:
            return self._measured(step) if self.measuring else step(self.size)
        except torch.cuda.OutOfMemoryError:
            if self.size == 1:
                raise
            self.size = max(1, self.size // 2)
            log.warning(f"[IDDM] out of GPU memory in a PGD step; retrying it with {self.size} photo(s) "
                        "per pass (pgd_batch). Set pgd_batch to this value to skip the retry next time.")
            torch.cuda.empty_cache()
            return step(self.size)

    def _measured(self, step: Callable[[int], T]) -> T:
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        result = step(1)
        per_photo = max(1, torch.cuda.max_memory_allocated(self.device) - before)
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        self.size = max(1, min(self.photos, int(free * FREE_MEMORY_SHARE // per_photo)))
        self.measuring = False
        log.info(f"[IDDM] a PGD pass needs {per_photo / 2**30:.2f} GiB per photo; pgd_batch auto = {self.size}")
        return result
