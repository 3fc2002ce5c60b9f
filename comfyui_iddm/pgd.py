"""The photo update of Step 2: one signed gradient step and the projection back into the budget."""
from __future__ import annotations

import torch
from torch import Tensor


def project(x: Tensor, x_orig: Tensor, eta: float) -> Tensor:
    """Proj onto {||x - x_orig||_inf <= eta} ∩ [0,1]. The ball is centred on the ORIGINAL photos,
    so however many iterations run, no pixel ever moves more than eta in total."""
    return torch.clamp(torch.minimum(torch.maximum(x, x_orig - eta), x_orig + eta), 0.0, 1.0)


def signed_step(x: Tensor, loss: Tensor, x_orig: Tensor, alpha: float, eta: float) -> Tensor:
    """X' <- Proj(X' - alpha * sign(grad_X' loss)); returns a new leaf tensor (no graph kept)."""
    (grad,) = torch.autograd.grad(loss, x)
    return project(x.detach() - alpha * grad.sign(), x_orig, eta)
