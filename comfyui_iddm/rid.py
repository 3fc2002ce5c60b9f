"""RID (arXiv 2412.09844): a network that cloaks a photo in one forward pass, trained with Adv-SDS.

The defender is the authors' DiT-style image-to-perturbation network: the photo (scaled to [-1,1])
cut into patches, a stack of transformer blocks, the patches put back together, and
delta = eta * tanh(.): the output can never leave the budget, and x' = clip(x + delta, 0, 1).
Their blocks are DiT's adaLN-Zero blocks with the conditioning fixed to zero, so each block's
modulation (shift, scale and gate of attention and MLP) is a learnt constant: that is what we keep.

Adv-SDS trains it: score distillation with the sign flipped. For a cloaked photo x', z_t is a noised
encode(x') and eps_hat the frozen model's noise estimate. SDS's gradient w.r.t. z_t,
w(t)(eps_hat - eps) with w(t) = 1 - alpha_bar_t, moves a sample towards what the model finds likely;
Adv-SDS descends along -w(t)(eps_hat - eps): away from it. Like SDS it skips the UNet's Jacobian,
so a training step costs one UNet forward per base model and no backward through it.
The regulariser regresses the network's perturbation onto a gradient-based defense's (ASPL's)
perturbation of the same photo (the authors' "pairs"). The ensemble variant averages the Adv-SDS
term over several base models (the authors: SD 1.4, 1.5 and 2.1).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PAPER_PIXEL_RANGE, PIXEL_RANGES, ConfigError
from .losses import NoiseDraw, draw_noise, expand
from .personalize import random_batch
from .pgd import project
from .ports import Denoiser


@dataclass(frozen=True)
class RIDArchitecture:
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


ARCHITECTURES: dict[str, RIDArchitecture] = {
    # The authors' released networks (their inference script's DiT: 512 px, patch 16, 14 blocks of
    # width 1152, 8 heads): 225 M parameters (their files hold 338 M: DiT's embedders and adaLN
    # weights, which only ever see a zero conditioning).
    "published": RIDArchitecture(patch_size=16, hidden_size=1152, depth=14, num_heads=8),
    # Ours for training on a CPU: the same design at toy width (1.9 M parameters).
    "small": RIDArchitecture(patch_size=8, hidden_size=192, depth=4, num_heads=4),
}


# --- the network ---------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _MLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


class _Block(nn.Module):
    """A DiT block whose adaLN modulation is a constant (the authors' conditioning is always zero).
    All-zero at the start: shift 0, scale 0 and gate 0, so every block begins as the identity."""

    def __init__(self, arch: RIDArchitecture) -> None:
        super().__init__()
        width = arch.hidden_size
        self.attn = _Attention(width, arch.num_heads)
        self.mlp = _MLP(width, int(width * arch.mlp_ratio))
        self.modulation = nn.Parameter(torch.zeros(6 * width))

    def forward(self, x: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation.chunk(6)
        x = x + gate1 * self.attn(_modulate(x, shift1, scale1))
        return x + gate2 * self.mlp(_modulate(x, shift2, scale2))


class RIDNet(nn.Module):
    """photos [B,3,H,W] in [0,1] -> perturbation in [0,1] units, |delta| <= budget everywhere.

    `budget` is eta in [0,1] units (RIDSettings.budget). Any H, W: the photo is reflect-padded to a
    multiple of the patch size and the perturbation cropped back; the position code is computed for
    the patch grid (the authors' fixed sin-cos table is this formula at 32 x 32 patches)."""

    def __init__(self, arch: RIDArchitecture, budget: float) -> None:
        super().__init__()
        self.arch, self.budget = arch, float(budget)
        width, patch = arch.hidden_size, arch.patch_size
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.blocks = nn.ModuleList(_Block(arch) for _ in range(arch.depth))
        self.final_modulation = nn.Parameter(torch.zeros(2 * width))
        self.final_linear = nn.Linear(width, patch * patch * 3)
        self._initialise()

    def _initialise(self) -> None:
        # DiT's: xavier for every linear (and the patch projection seen as one), zero biases, and a
        # zero output layer, so training starts from "no perturbation".
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.final_linear.weight)

    def forward(self, images: Tensor) -> Tensor:
        p = self.arch.patch_size
        h, w = images.shape[-2:]
        pad_h, pad_w = -h % p, -w % p
        x = images * 2 - 1  # the authors' network sees photos in [-1,1]
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate")
        rows, cols = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = tokens + sincos_positions(self.arch.hidden_size, rows, cols).to(tokens)
        for block in self.blocks:
            tokens = block(tokens)
        shift, scale = self.final_modulation.chunk(2)
        patches = self.final_linear(_modulate(tokens, shift, scale))  # [B, rows*cols, p*p*3]
        out = patches.reshape(-1, rows, cols, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(-1, 3, rows * p, cols * p)
        # The authors' tanh(.) * eps is in [-1,1] units; in [0,1] units that is tanh(.) * eps / 2.
        return torch.tanh(out[..., :h, :w]) * self.budget


def sincos_positions(width: int, rows: int, cols: int) -> Tensor:
    """MAE's fixed 2-D sin-cos code [rows*cols, width], row-major: a quarter of the channels each for
    sin and cos of the column, then of the row, at frequencies 1/10000^(i/(width/4))."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    row, col = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                              indexing="ij")
    col_angles, row_angles = col.reshape(-1, 1) * omega, row.reshape(-1, 1) * omega
    return torch.cat([col_angles.sin(), col_angles.cos(), row_angles.sin(), row_angles.cos()], dim=1).float()


def rid_cloak(photos: Tensor, weights: "RIDNet | Path | str", *, eta: float | None = None,
              pixel_range: str = PAPER_PIXEL_RANGE, batch_size: int = 4) -> Tensor:
    """Cloaked photos [N,3,H,W] in [0,1] from a RID network (a RIDNet, or a weight file: ours or the
    authors', see rid_weights.load_rid; eta overrides the file's budget)."""
    if not isinstance(weights, RIDNet):
        from .rid_weights import load_rid
        weights = load_rid(weights, eta, pixel_range)
    return cloak_photos(weights, photos, batch_size)


@torch.no_grad()
def cloak_photos(net: RIDNet, images: Tensor, batch_size: int = 4) -> Tensor:
    """One forward pass per batch: Proj(x + delta) onto the budget around x and [0,1] (the network's
    tanh already keeps delta inside the budget; the projection is the [0,1] clip)."""
    device = next(net.parameters()).device
    out = [project(x + net(x), x, net.budget).cpu()
           for x in (images[i:i + batch_size].to(device, torch.float32) for i in range(0, images.shape[0], batch_size))]
    return torch.cat(out) if out else images.clone()


# --- Adv-SDS and the regulariser -----------------------------------------------------------------
def sds_weight(denoiser: Denoiser, t: Tensor) -> Tensor:
    """w(t) = 1 - alpha_bar_t, the authors' weighting (DreamFusion's choice)."""
    return 1.0 - denoiser.schedule.alphas_cumprod[t.to(denoiser.schedule.alphas_cumprod.device)]


@dataclass(frozen=True)
class AdvSDS:
    surrogate: Tensor  # a scalar whose gradient w.r.t. the photos is the Adv-SDS gradient
    denoising_error: Tensor  # mean ||eps_hat - eps||^2 on these photos (Adv-SDS pushes it up), detached


def adv_sds(denoiser: Denoiser, z0: Tensor, cond: Tensor, draw: NoiseDraw) -> AdvSDS:
    """Adv-SDS on the latents of cloaked photos (differentiable w.r.t. them): its gradient w.r.t. z_t
    is -w(t)(eps_hat - eps) / numel, as the authors' 0.5 * mse(z_t, z_t - grad) gives; the frozen
    model runs without a graph."""
    schedule = denoiser.schedule
    z_t = schedule.add_noise(z0, draw.noise, draw.t)
    with torch.no_grad():
        output = denoiser.predict(z_t.detach(), draw.t, expand(cond, z_t))
        residual = schedule.predict_noise(z_t.detach(), draw.t, output) - draw.noise.float()
        weight = sds_weight(denoiser, draw.t).to(z_t.device).view(-1, *([1] * (z_t.ndim - 1)))
        grad = torch.nan_to_num(-weight * residual)
    return AdvSDS((z_t * grad).sum() / z_t.numel(), residual.pow(2).mean())


def ensemble_adv_sds(denoisers: Sequence[Denoiser], conds: Sequence[Tensor], cloaked: Tensor,
                     generator: torch.Generator, timesteps: tuple[int, int]) -> AdvSDS:
    """The ensemble variant: Adv-SDS averaged over the base models (one noise draw per model)."""
    terms = []
    for denoiser, cond in zip(denoisers, conds, strict=True):
        z0 = denoiser.encode(cloaked)
        terms.append(adv_sds(denoiser, z0, cond, draw_noise(denoiser, z0.shape, generator, timesteps)))
    return AdvSDS(torch.stack([t.surrogate for t in terms]).mean(),
                  torch.stack([t.denoising_error for t in terms]).mean())


def pair_regulariser(perturbation: Tensor, photos: Tensor, targets: Tensor) -> Tensor:
    """The regression onto a gradient-based defense's perturbation of the same photos (MSE, [0,1] units)."""
    return F.mse_loss(perturbation, (targets - photos).to(perturbation))


# --- training ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RIDSettings:
    architecture: str = "small"
    # In pixel_range units: Anti-DreamBooth's (and `iddm cloak`'s) 0.05, so RID and ASPL compare at one
    # budget; the authors released networks at 6, 8 and 12/255 (0.024, 0.031, 0.047).
    eta: float = 0.05
    pixel_range: str = PAPER_PIXEL_RANGE
    resolution: int = 128
    steps: int = 400
    batch_size: int = 4
    lr: float = 3e-4  # the authors' AdamW settings
    weight_decay: float = 1e-2
    reg_weight: float = 10.0  # the authors' regression script: 10 x MSE
    timesteps: tuple[int, int] = (0, 999)
    prompt: str = ""  # the authors condition on an empty prompt: the cloak is prompt-agnostic
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "timesteps", tuple(self.timesteps))
        self.validate()

    @property
    def budget(self) -> float:
        """eta in [0,1] pixel units."""
        return self.eta * PIXEL_RANGES[self.pixel_range]

    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture={self.architecture!r} is not one of {sorted(ARCHITECTURES)}.")
        if self.pixel_range not in PIXEL_RANGES:
            raise ConfigError(f"pixel_range={self.pixel_range!r} is not one of {sorted(PIXEL_RANGES)}.")
        if not (isinstance(self.eta, (int, float)) and 0 < self.eta <= 1):
            raise ConfigError(f"eta={self.eta!r} is out of range; give a budget in (0, 1] "
                              f"(pixel_range {self.pixel_range}; the authors' 12/255 = 0.047).")
        patch = ARCHITECTURES[self.architecture].patch_size
        if not isinstance(self.resolution, int) or self.resolution < 64 or self.resolution % max(8, patch):
            raise ConfigError(f"resolution={self.resolution!r} must be a whole number of at least 64 and a "
                              f"multiple of {max(8, patch)} (the {self.architecture} network's patch size "
                              "and the model's 8x latent); e.g. 128 or 256.")
        for name, low in (("steps", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name}={value!r} must be a whole number of at least {low}.")
        for name in ("lr", "weight_decay", "reg_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0 or (name == "lr" and value == 0):
                raise ConfigError(f"{name}={value!r} must be a number >= 0" + (" (and > 0)." if name == "lr" else "."))
        lo, hi = self.timesteps if len(self.timesteps) == 2 else (-1, -1)
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= 999):
            raise ConfigError(f"timesteps={self.timesteps!r} is not a range lo,hi with 0 <= lo <= hi <= 999.")

    def build_net(self) -> RIDNet:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return RIDNet(ARCHITECTURES[self.architecture], self.budget)


@dataclass(frozen=True)
class RIDStep:
    step: int
    steps: int
    denoising_error: float  # Adv-SDS's figure, averaged over the base models: rises as the cloak learns
    regulariser: float | None  # MSE to the pair perturbations (None without pairs)


@dataclass
class RIDTraining:
    net: RIDNet
    history: list[RIDStep]
    seconds: float


def train_rid(faces: Tensor, denoisers: Sequence[Denoiser], settings: RIDSettings, *,
              targets: Tensor | None = None, net: RIDNet | None = None,
              on_step: Callable[[RIDStep], None] | None = None) -> RIDTraining:
    """Train the cloaking network on face crops [N,3,R,R] in [0,1] with Adv-SDS over every base model
    (the ensemble variant when there are several) plus, when `targets` (the same faces cloaked by a
    gradient-based defense) are given, the pair regulariser weighted by settings.reg_weight.
    Random horizontal flips augment the batches (a face's mirror image is a face)."""
    if not denoisers:
        raise ValueError("RID training needs at least one base model.")
    if targets is not None and targets.shape != faces.shape:
        raise ValueError(f"the pair targets ({tuple(targets.shape)}) must match the faces ({tuple(faces.shape)}).")
    device = denoisers[0].device
    net = (net or settings.build_net()).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    conds = [d.encode_prompt([settings.prompt]) for d in denoisers]
    history, start = [], time.perf_counter()
    for step in range(1, settings.steps + 1):
        rows = random_batch(faces.shape[0], settings.batch_size, generator)
        flip = torch.rand(rows.shape[0], generator=generator) < 0.5
        x = _flip(faces[rows], flip).to(device)
        delta = net(x)
        cloaked = (x + delta).clamp(0, 1)
        sds = ensemble_adv_sds(denoisers, conds, cloaked, generator, settings.timesteps)
        loss = sds.surrogate
        regulariser = None
        if targets is not None and settings.reg_weight > 0:
            regulariser = pair_regulariser(delta, x, _flip(targets[rows], flip).to(device))
            loss = loss + settings.reg_weight * regulariser
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record = RIDStep(step, settings.steps, float(sds.denoising_error),
                         None if regulariser is None else float(regulariser.detach()))
        history.append(record)
        if on_step is not None:
            on_step(record)
    return RIDTraining(net.eval(), history, time.perf_counter() - start)


def _flip(images: Tensor, which: Tensor) -> Tensor:
    return torch.where(which.view(-1, 1, 1, 1), images.flip(-1), images)


# --- the regulariser's pairs and the cloak method --------------------------------------------------
def aspl_pairs(faces: Tensor, denoiser: Denoiser, settings: RIDSettings, iterations: int, group: int,
               on_group: Callable[[int, int], None] | None = None) -> Tensor:
    """The regulariser's targets: the faces cloaked by ASPL (cloak.py's "aspl") at the same budget, in
    groups of `group` faces (the authors ran Anti-DreamBooth per identity: neighbouring files are
    usually the same person). Each group's surrogate starts from the base model, and the base model
    is left as it was found (Adv-SDS must see the base model, not a surrogate)."""
    from .cloak import CloakRequest, cloak_config, make_cloak

    config = cloak_config(eta=settings.eta, pixel_range=settings.pixel_range, iterations=iterations,
                          resolution=settings.resolution, seed=settings.seed)
    cloak = make_cloak(CloakRequest("aspl", config, denoiser=lambda: denoiser))
    base_lora = denoiser.lora_state_dict()
    cloaked, groups = [], range(0, faces.shape[0], group)
    try:
        for number, start in enumerate(groups, 1):
            denoiser.load_lora_state_dict(base_lora)
            cloaked.append(cloak.protect(faces[start:start + group]).cpu())
            if on_group is not None:
                on_group(number, len(groups))
    finally:
        denoiser.load_lora_state_dict(base_lora)
    return torch.cat(cloaked)


class RIDCloak:
    """cloak.Cloak for a trained RID network: one forward pass, no diffusion model."""

    method = "rid"

    def __init__(self, net: RIDNet, trained_budget: float | None) -> None:
        self.net = net
        self.figures = {} if trained_budget is None else {"trained_eta_0_1": round(trained_budget, 5)}

    def protect(self, photos: Tensor) -> Tensor:
        return cloak_photos(self.net, photos)


def rid_cloak_method(request) -> RIDCloak:
    """cloak.METHODS' factory: the network of request.rid_weights at the request's budget (the shared
    contract: no pixel more than config.budget's eta from its original; a network trained at another
    budget is rescaled, as the authors' inference script's --eps does)."""
    from .rid_weights import load_rid, saved_budget

    if request.rid_weights is None:
        raise ConfigError("method 'rid' needs the network's weights: --rid-weights FILE (written by "
                          "`iddm rid-train`, or the authors' released .bin; README: RID).")
    net = load_rid(request.rid_weights, request.config.eta, request.config.pixel_range)
    return RIDCloak(net, saved_budget(request.rid_weights))
