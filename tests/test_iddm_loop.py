"""Algorithm 1's invariants on the tiny model and the weightless test recognizer (issue 2's list):
the L-inf ball around the ORIGINAL photos and [0,1] after every PGD step, floor(rho*T) Stage I
steps, the gradient signs of both stages, determinism, progress events, cancellation."""
from __future__ import annotations

import math

import pytest
import torch

from comfyui_iddm import iddm
from comfyui_iddm.backends.diffusers_backend import load_denoiser
from comfyui_iddm.faces.ensemble import IdentityEnsemble
from comfyui_iddm.iddm import PHASES, Cancelled, run_iddm, total_steps
from comfyui_iddm.losses import NoiseDraw, denoised_prediction, reconstruction_loss
from comfyui_iddm.pgd import project, signed_step

from conftest import TinyRecognizer, synthetic_photos, tiny_config

PHOTOS = synthetic_photos(4, 64, seed=1)
REFERENCE, PROTECTION = PHOTOS[:2], PHOTOS[2:]
LANDMARKS = torch.tensor([[[22.0, 30.0], [42.0, 30.0], [32.0, 40.0], [24.0, 50.0], [40.0, 50.0]]]).repeat(2, 1, 1)


def run(config, **kwargs):
    denoiser = load_denoiser("tiny", config)
    scorer = IdentityEnsemble.from_reference([TinyRecognizer()], REFERENCE, LANDMARKS, config.tau)
    return denoiser, run_iddm(denoiser, REFERENCE, PROTECTION, LANDMARKS, scorer, config, **kwargs)


@pytest.fixture
def recorded_steps(monkeypatch):
    """Every PGD step's input and output X', in order."""
    steps = []

    def recording(x, grad, x_orig, alpha, eta):
        out = signed_step(x, grad, x_orig, alpha, eta)
        steps.append((x.detach().clone(), out.clone()))
        return out

    monkeypatch.setattr(iddm, "signed_step", recording)
    return steps


def test_every_step_stays_in_the_eta_ball_around_the_original_photos_and_in_0_1(recorded_steps):
    # alpha > eta / 2: two steps can leave the ball, so the projection must act; several iterations,
    # so a ball re-centred on each iteration's X0 would drift beyond eta.
    config = tiny_config(iterations=3, pgd_steps=4, rho=0.5, eta=0.06, pgd_alpha=0.04, ft_steps=1)
    eta = config.budget[0]  # eta 0.06 in the paper's [-1,1] units is 0.03 of the [0,1] range
    assert eta == pytest.approx(0.03)
    _, result = run(config)
    assert len(recorded_steps) == 3 * 4
    for _, x in recorded_steps:
        assert float((x - PROTECTION).abs().max()) <= eta + 1e-6
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float((result.decoupled - PROTECTION).abs().max()) == pytest.approx(eta, abs=1e-6)
    # X0 <- X': iteration k+1 starts where iteration k ended.
    for k in (1, 2):
        assert torch.equal(recorded_steps[4 * k][0], recorded_steps[4 * k - 1][1])


def test_projection_clips_to_ball_and_range():
    x_orig = torch.tensor([0.0, 0.5, 0.99, 0.3])
    x = torch.tensor([-0.2, 0.9, 1.3, 0.31])
    assert torch.allclose(project(x, x_orig, 0.1), torch.tensor([0.0, 0.6, 1.0, 0.31]))


def test_signed_step_descends_the_loss():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    weights = torch.randn(2, 3, 8, 8)
    (grad,) = torch.autograd.grad((x * weights).sum(), x)
    out = signed_step(x, grad, x.detach(), alpha=0.01, eta=1.0)
    moved = out - x.detach()
    inside = (x.detach() > 0.01) & (x.detach() < 0.99)  # away from the [0,1] clamp
    assert torch.allclose(moved[inside], -0.01 * weights.sign()[inside], atol=1e-6)


@pytest.mark.parametrize("rho, steps", [(0.3, 8), (0.1, 8), (0.5, 4), (0.7, 3), (1.0, 4), (0.0, 4)])
def test_stage_one_takes_floor_rho_t_steps(rho, steps):
    assert tiny_config(rho=rho, pgd_steps=steps).stage1_steps == math.floor(rho * steps + 1e-9)


@pytest.mark.parametrize("rho, stage1, stage2", [(0.5, 2, 2), (1.0, 4, 0), (0.0, 0, 4), (0.3, 1, 3)])
def test_the_loop_runs_floor_rho_t_stage_one_steps_then_stage_two(rho, stage1, stage2):
    events = []
    config = tiny_config(iterations=2, pgd_steps=4, rho=rho, ft_steps=1)
    _, result = run(config, on_progress=events.append)
    for k, record in enumerate(result.iterations, start=1):
        assert len(record.stage1_loss) == stage1 and len(record.stage2_score) == stage2
        phases = [e.phase for e in events if e.iteration == k]
        assert phases == (["finetune_reference"] + ["stage1"] * stage1 + ["stage2"] * stage2
                          + ["finetune_decoupled"])


def _fixed_draws(denoiser, shape, count, t_range, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [NoiseDraw(torch.randn(shape, generator=g), torch.randint(t_range[0], t_range[1] + 1, (shape[0],), generator=g))
            for _ in range(count)]


def test_stage_one_lowers_reconstruction_loss_and_stage_two_lowers_identity_score(monkeypatch):
    """Measured on the frozen model of Step 2, at fixed noise draws, before and after each Step 2."""
    measured = {"stage1": [], "stage2": []}
    original = iddm.decouple_photos

    def measuring(denoiser, scorer, x_prime, x_orig, landmarks, cond, config, *rest):
        out = original(denoiser, scorer, x_prime, x_orig, landmarks, cond, config, *rest)
        with torch.no_grad():
            z_in, z_out = denoiser.encode(x_prime), denoiser.encode(out)
            if config.rho == 1.0:
                draws = _fixed_draws(denoiser, z_in.shape, 8, (0, 999))
                before = sum(float(reconstruction_loss(denoiser, z_in, cond, d)) for d in draws)
                after = sum(float(reconstruction_loss(denoiser, z_out, cond, d)) for d in draws)
                measured["stage1"].append(before - after)
            else:
                draws = _fixed_draws(denoiser, z_in.shape, 4, config.stage2_timesteps)
                score = lambda z, d: float(scorer.score(denoised_prediction(denoiser, z, cond, d), landmarks).total.mean())
                measured["stage2"].append(sum(score(z_in, d) - score(z_out, d) for d in draws))
        return out

    monkeypatch.setattr(iddm, "decouple_photos", measuring)
    run(tiny_config(iterations=2, pgd_steps=4, rho=1.0, ft_steps=1))
    run(tiny_config(iterations=2, pgd_steps=4, rho=0.0, ft_steps=1))
    assert all(drop > 0 for drop in measured["stage1"]), measured
    assert all(drop > 0 for drop in measured["stage2"]), measured


def test_stage_two_scores_fall_within_an_iteration():
    _, result = run(tiny_config(iterations=1, pgd_steps=6, rho=0.0, ft_steps=1))
    scores = result.iterations[0].stage2_score
    assert scores[-1] < scores[0]


def test_the_model_is_frozen_during_the_photo_update(monkeypatch):
    snapshots = []
    original = iddm.decouple_photos

    def checking(denoiser, *args):
        before = [p.detach().clone() for p in denoiser.trainable_parameters()]
        out = original(denoiser, *args)
        after = denoiser.trainable_parameters()
        snapshots.append(all(torch.equal(a, b) for a, b in zip(before, after)) and all(p.requires_grad for p in after))
        return out

    monkeypatch.setattr(iddm, "decouple_photos", checking)
    run(tiny_config(ft_steps=1))
    assert snapshots == [True]


def test_same_seed_same_lora_and_photos_different_seed_different():
    config = tiny_config(ft_steps=2)
    _, first = run(config)
    _, second = run(config)
    _, other = run(config.replace(seed=1))
    assert first.lora.keys() == second.lora.keys()
    assert all(torch.equal(first.lora[k], second.lora[k]) for k in first.lora)
    assert torch.equal(first.decoupled, second.decoupled)
    assert any(not torch.equal(first.lora[k], other.lora[k]) for k in first.lora)


def test_progress_events_count_every_step_once():
    events = []
    config = tiny_config(iterations=2, ft_steps=2, pgd_steps=3, rho=0.34)
    run(config, on_progress=events.append)
    assert len(events) == total_steps(config) == 2 * (2 * 2 + 3)
    assert [e.done for e in events] == list(range(1, total_steps(config) + 1))
    assert all(e.total == total_steps(config) and e.phase in PHASES for e in events)
    for e in events:
        assert 1 <= e.step <= e.steps and math.isfinite(e.value)
    per_phase = {phase: sum(e.phase == phase for e in events) for phase in PHASES}
    assert per_phase == {"finetune_reference": 4, "stage1": 2, "stage2": 4, "finetune_decoupled": 4}


@pytest.mark.parametrize("cancel_at", [1, 3, 5])
def test_cancel_stops_within_one_step(cancel_at):
    """The flag is raised during step `cancel_at`; no further model call happens before Cancelled."""
    config = tiny_config(iterations=2, ft_steps=2, pgd_steps=2, rho=0.5)
    denoiser = load_denoiser("tiny", config)
    scorer = IdentityEnsemble.from_reference([TinyRecognizer()], REFERENCE, LANDMARKS, config.tau)
    events, calls_after_flag, flag = [], [], []
    predict = denoiser.predict

    def counting_predict(*args):
        if flag:
            calls_after_flag.append(1)
        return predict(*args)

    denoiser.predict = counting_predict

    def on_progress(event):
        events.append(event)
        if event.done == cancel_at:
            flag.append(True)

    with pytest.raises(Cancelled, match="cancelled at iteration 1"):
        run_iddm(denoiser, REFERENCE, PROTECTION, LANDMARKS, scorer, config, on_progress=on_progress,
                 should_cancel=lambda: bool(flag))
    assert len(events) == cancel_at
    assert calls_after_flag == []


def test_stage_two_without_a_scorer_is_refused():
    config = tiny_config(rho=0.5)
    with pytest.raises(ValueError, match="Stage II needs face recognizers"):
        run_iddm(load_denoiser("tiny", config), REFERENCE, PROTECTION, LANDMARKS, None, config)


@pytest.mark.slow
def test_memory_does_not_grow_across_iterations():
    """Issue 5's load check at test scale (benchmarks/bench_load.py measures 50 photos at 512 px):
    the peak resident memory of the last iteration stays near iteration 2's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_load import IterationPeaks

    photos = synthetic_photos(16, 128, seed=5)
    landmarks = LANDMARKS[:1].repeat(8, 1, 1) * 2
    config = tiny_config(iterations=6, resolution=128, ft_steps=2, pgd_steps=4, rho=0.5)
    denoiser = load_denoiser("tiny", config)
    scorer = IdentityEnsemble.from_reference([TinyRecognizer()], photos[:8], landmarks, config.tau)
    with IterationPeaks() as peaks:
        run_iddm(denoiser, photos[:8], photos[8:], landmarks, scorer, config, on_progress=peaks.on_progress)
    by_k = {r.iteration: r.peak_mb for r in peaks.results}
    assert sorted(by_k) == list(range(1, 7))
    working_set = by_k[2] - peaks.baseline_mb
    print(f"baseline {peaks.baseline_mb:.0f} MB, peak RSS per iteration {by_k}")
    assert by_k[6] - by_k[2] <= 0.25 * working_set + 16, (peaks.baseline_mb, by_k)
