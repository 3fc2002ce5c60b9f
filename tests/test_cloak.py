"""Cloaks (cloak.py, aspl.py) and the attacker (attack.py) on the tiny model: ASPL's sign and budget,
its frozen model during PGD, its snapshot of f, determinism, progress and cancellation; the noise
control; the method registry's refusals."""
from __future__ import annotations

import pytest
import torch

from comfyui_iddm import aspl
from comfyui_iddm.aspl import PHASES, TrainingSnapshot, run_aspl, total_steps
from comfyui_iddm.attack import attack_config, attack_photos
from comfyui_iddm.backends.diffusers_backend import load_denoiser
from comfyui_iddm.cloak import (METHODS, Cloak, CloakRequest, cloak_config, make_cloak, run_cloak)
from comfyui_iddm.config import ConfigError
from comfyui_iddm.iddm import Cancelled, stage1_loss
from comfyui_iddm.losses import draw_noise
from comfyui_iddm.personalize import FineTuning
from comfyui_iddm.pgd import signed_step

from conftest import synthetic_photos

PHOTOS = synthetic_photos(3, 64, seed=4)


def small(**changes):
    return cloak_config(**{**dict(resolution=64, iterations=2, ft_steps=2, pgd_steps=3), **changes})


@pytest.fixture
def recorded_steps(monkeypatch):
    steps = []

    def recording(x, grad, x_orig, alpha, eta):
        out = signed_step(x, grad, x_orig, alpha, eta)
        steps.append(out.clone())
        return out

    monkeypatch.setattr(aspl, "signed_step", recording)
    return steps


def test_every_aspl_step_stays_in_the_budget_around_the_original_photos(recorded_steps):
    # a step as large as the budget: after two steps the projection must act
    config = small(eta=0.06, pgd_alpha=0.06, iterations=3)
    eta = config.budget[0]
    assert eta == pytest.approx(0.03)  # 0.06 in [-1,1] units
    result = run_aspl(load_denoiser("tiny", config), PHOTOS, PHOTOS, config)
    assert len(recorded_steps) == 3 * 3
    for x in recorded_steps:
        assert float((x - PHOTOS).abs().max()) <= eta + 1e-6
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float((result.cloaked - PHOTOS).abs().max()) == pytest.approx(eta, abs=1e-6)


def test_aspl_raises_the_surrogates_denoising_loss():
    """The opposite sign of IDDM's Stage I: on the very draws of a PGD step, the loss of the photos it
    returns is above the loss of the photos it was given."""
    config = small(pgd_steps=1, eta=0.1, pgd_alpha=0.02)
    denoiser = load_denoiser("tiny", config)
    training = FineTuning.start(denoiser, config)
    latent_shape = denoiser.encode(PHOTOS).shape
    same_draws = torch.Generator().set_state(training.generator.get_state())
    x_adv = aspl.raise_denoising_loss(denoiser, training, PHOTOS, PHOTOS, config, aspl.PhotoChunks(0, 3, denoiser.device),
                                      latent_shape, aspl.ASPLRecord(), lambda step, loss: None)
    loss = stage1_loss(denoiser, training.cond, draw_noise(denoiser, latent_shape, same_draws))
    with torch.no_grad():
        before, after = loss(PHOTOS, slice(None))[0], loss(x_adv, slice(None))[0]
    assert float(after) > float(before)


def test_the_model_is_frozen_during_pgd(monkeypatch):
    config = small(iterations=1)
    denoiser = load_denoiser("tiny", config)
    seen = []
    real = aspl.photo_gradient

    def checking(*args, **kwargs):
        seen.append([p.requires_grad for p in denoiser.trainable_parameters()])
        return real(*args, **kwargs)

    monkeypatch.setattr(aspl, "photo_gradient", checking)
    run_aspl(denoiser, PHOTOS, PHOTOS, config)
    assert len(seen) == config.pgd_steps and not any(any(flags) for flags in seen)
    assert all(p.requires_grad for p in denoiser.trainable_parameters())  # back on for fine-tuning


def test_the_snapshot_puts_f_back_after_the_surrogates_turn():
    config = small()
    denoiser = load_denoiser("tiny", config)
    params = denoiser.trainable_parameters()
    training = FineTuning.start(denoiser, config)
    latents = denoiser.encode(PHOTOS)
    training.run(latents, 2)  # f has weights and optimizer moments of its own
    weights = [p.detach().clone() for p in params]
    moments = [training.optimizer.state[p]["exp_avg"].clone() for p in params]
    f = TrainingSnapshot.take(params, training.optimizer)
    training.run(latents, 3)  # the surrogate's turn changes both
    assert not all(torch.equal(p, w) for p, w in zip(params, weights))
    f.restore(params, training.optimizer)
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    assert all(torch.equal(training.optimizer.state[p]["exp_avg"], m) for p, m in zip(params, moments))


def test_aspl_is_deterministic_and_leaves_the_model_as_it_came():
    config = small()
    denoiser = load_denoiser("tiny", config)
    before = denoiser.lora_state_dict()
    cloak = make_cloak(CloakRequest("aspl", config, denoiser=lambda: denoiser))
    assert isinstance(cloak, Cloak) and cloak.method == "aspl"
    first, second = cloak.protect(PHOTOS), cloak.protect(PHOTOS)
    assert torch.equal(first, second) and not torch.equal(first, PHOTOS)
    assert all(torch.equal(v, before[k]) for k, v in denoiser.lora_state_dict().items())
    assert set(cloak.figures) == {"surrogate_loss_first", "surrogate_loss_last"}


def test_aspl_reports_its_phases_and_can_be_cancelled():
    config = small()
    events = []
    run_aspl(load_denoiser("tiny", config), PHOTOS, PHOTOS, config, on_progress=events.append)
    assert len(events) == total_steps(config) == 2 * (2 + 3 + 2)
    assert [e.phase for e in events[:7]] == [PHASES[0]] * 2 + [PHASES[1]] * 3 + [PHASES[2]] * 2
    assert events[-1].done == events[-1].total
    with pytest.raises(Cancelled):
        run_aspl(load_denoiser("tiny", config), PHOTOS, PHOTOS, config, should_cancel=lambda: True)


def test_noise_moves_every_pixel_by_the_budget_and_none_nothing():
    config = small(eta=0.1)
    eta = config.budget[0]
    photos = PHOTOS.clamp(0.1, 0.9)  # away from 0 and 1, where the clip would shorten the change
    outcome = run_cloak(make_cloak(CloakRequest("noise", config)), photos)
    change = outcome.cloaked - photos
    assert torch.allclose(change.abs(), torch.full_like(change, eta), atol=1e-6)
    assert 0.4 < float((change > 0).float().mean()) < 0.6  # random signs
    assert outcome.figures["linf"] == pytest.approx(eta, abs=1e-5)
    assert torch.equal(make_cloak(CloakRequest("noise", config)).protect(photos), outcome.cloaked)  # seeded
    unchanged = run_cloak(make_cloak(CloakRequest("none", config)), photos)
    assert torch.equal(unchanged.cloaked, photos) and unchanged.figures["ssim"] == pytest.approx(1.0)


def test_unknown_methods_and_aspl_without_a_model_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"'glaze' is unknown; choose one of aspl, .*noise"):
        make_cloak(CloakRequest("glaze", small()))
    with pytest.raises(ConfigError, match=r"'aspl' needs the diffusion model.*--base"):
        make_cloak(CloakRequest("aspl", small())).protect(PHOTOS)
    with pytest.raises(ConfigError, match=r"\['rho'\] are not cloak settings"):
        cloak_config(rho=0.3)
    assert {"aspl", "noise", "none"} <= set(METHODS)


def test_the_attacker_fine_tunes_a_lora_of_its_budget_from_the_base_model():
    config = attack_config(resolution=64, ft_steps=3)
    denoiser = load_denoiser("tiny", config)
    events = []
    result = attack_photos(denoiser, PHOTOS, config, on_progress=events.append)
    assert len(result.losses) == 3 and len(events) == 3
    assert any(v.abs().sum() > 0 for k, v in result.lora.items() if k.endswith(".lora_up.weight"))
    again = attack_photos(load_denoiser("tiny", config), PHOTOS, config)
    assert result.losses == again.losses  # the same seed, the same attack
