"""Engine progress -> ComfyUI: the node's progress bar, the web chart's events, Cancel."""
from __future__ import annotations

from dataclasses import asdict

import comfy.model_management as mm
import comfy.utils

PROGRESS_EVENT = "iddm.progress"  # web/iddm.js listens for it


class ComfyProgress:
    """Called by the engine after every FT / PGD step with a ProgressEvent (figures only)."""

    def __init__(self, node_id: str | None, total: int) -> None:
        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def __call__(self, event) -> None:
        from server import PromptServer

        server = PromptServer.instance
        server.send_sync(PROGRESS_EVENT, {"node": self.node_id, **asdict(event)}, server.client_id)
        # ComfyUI's progress hook also raises if the user pressed Cancel.
        self.bar.update_absolute(event.done, event.total)


def cancel_requested() -> bool:
    """The engine polls this between steps."""
    return mm.processing_interrupted()


def raise_if_interrupted() -> None:
    """Turn the engine's Cancelled into ComfyUI's own interruption (shown as 'interrupted')."""
    mm.throw_exception_if_processing_interrupted()
