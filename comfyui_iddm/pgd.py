"""The photo update of Step 2: the photos' gradient (in chunks, loss-scaled), one signed step and
the projection back into the budget."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

# fp16 backward flushes gradients below ~6e-8 to zero; sign() of a zero leaves the pixel unmoved.
# The loss is scaled up first (sign() is scale-free) and the scale halves while the gradient overflows.
FP16_LOSS_SCALE = 2.0 ** 16


def project(x: Tensor, x_orig: Tensor, eta: float | Tensor) -> Tensor:
    """Proj onto {||x - x_orig||_inf <= eta} ∩ [0,1]. The ball is centred on the ORIGINAL photos,
    so however many iterations run, no pixel ever moves more than eta in total. eta may be a
    per-pixel budget (broadcastable; 0 = the pixel never changes)."""
    return torch.clamp(torch.minimum(torch.maximum(x, x_orig - eta), x_orig + eta), 0.0, 1.0)


def signed_step(x: Tensor, grad: Tensor, x_orig: Tensor, alpha: float | Tensor, eta: float | Tensor) -> Tensor:
    """X' <- Proj(X' - alpha * sign(grad_X' loss)); returns a new tensor (no graph kept)."""
    return project(x.detach() - alpha * grad.sign(), x_orig, eta)


@dataclass(frozen=True)
class PhotoGradient:
    grad: Tensor  # d loss / d X', like X'
    loss: float  # the whole batch's loss
    per_photo: Tensor  # [N] each photo's own figure (Stage I: its L_rec; Stage II: its S), detached
    zero_fraction: float  # share of gradient entries exactly 0: those pixels do not move


# (photos of the chunk, their rows) -> (the chunk's share of the batch loss, per-photo figures)
ChunkLoss = Callable[[Tensor, slice], tuple[Tensor, Tensor]]


def photo_gradient(chunk_loss: ChunkLoss, x: Tensor, chunk: int, loss_scale: float = 1.0) -> PhotoGradient:
    """The gradient of a batch loss w.r.t. the photos, `chunk` photos per forward/backward.

    chunk_loss(x_rows, rows) returns the chunk's share of the batch loss (the shares add up to the
    batch loss; each photo's loss depends on that photo only) and the photos' own figures, so the
    result equals one pass over all photos up to float rounding. loss_scale > 1 (fp16) scales before
    backward and halves on overflow."""
    grads, figures, total = [], [], 0.0
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        grad, loss, per_photo = _chunk_gradient(chunk_loss, x[rows], rows, loss_scale)
        grads.append(grad)
        figures.append(per_photo)
        total += loss
    grad = torch.cat(grads)
    return PhotoGradient(grad, total, torch.cat(figures), float((grad == 0).float().mean()))


def _chunk_gradient(chunk_loss: ChunkLoss, x_rows: Tensor, rows: slice,
                    scale: float) -> tuple[Tensor, float, Tensor]:
    while True:
        leaf = x_rows.detach().requires_grad_(True)
        loss, per_photo = chunk_loss(leaf, rows)
        (grad,) = torch.autograd.grad(loss * scale, leaf)
        if scale <= 1.0 or torch.isfinite(grad).all():
            return grad, float(loss.detach()), per_photo.detach().float().reshape(-1)
        scale = max(1.0, scale / 2)  # overflow in the scaled backward: same step, smaller scale


def loss_scale_for(dtype: torch.dtype) -> float:
    return FP16_LOSS_SCALE if dtype == torch.float16 else 1.0
