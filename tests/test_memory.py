"""Memory: the PGD photo update in chunks (pgd_batch) is exact, loss scaling recovers from overflow,
and an out-of-memory step is retried once with half the chunk."""
from __future__ import annotations

import logging

import pytest
import torch

from comfyui_iddm import iddm
from comfyui_iddm.backends.diffusers_backend import load_denoiser
from comfyui_iddm.faces.ensemble import IdentityEnsemble
from comfyui_iddm.iddm import run_iddm
from comfyui_iddm.memory import PhotoChunks
from comfyui_iddm.pgd import photo_gradient
from conftest import TinyRecognizer, synthetic_photos, tiny_config

PHOTOS = synthetic_photos(4, 64, seed=2)
REFERENCE, PROTECTION = PHOTOS[:2], PHOTOS[2:]
LANDMARKS = torch.tensor([[[22.0, 30.0], [42.0, 30.0], [32.0, 40.0], [24.0, 50.0], [40.0, 50.0]]]).repeat(2, 1, 1)


def test_photo_gradient_in_chunks_equals_one_pass():
    weights = torch.randn(5, 3, 8, 8)
    x = torch.rand(5, 3, 8, 8)

    def chunk_loss(rows_x, rows):  # each photo's loss depends on that photo only
        per_photo = (torch.tanh(rows_x * weights[rows]) ** 2).flatten(1).sum(1)
        return per_photo.sum() / x.shape[0], per_photo

    whole = photo_gradient(chunk_loss, x, chunk=5)
    for chunk in (1, 2, 3):
        part = photo_gradient(chunk_loss, x, chunk=chunk)
        assert torch.allclose(part.grad, whole.grad, atol=1e-7) and part.loss == pytest.approx(whole.loss, rel=1e-6)
        assert torch.allclose(part.per_photo, whole.per_photo)


def test_loss_scaling_halves_until_the_gradient_is_finite():
    x = torch.rand(2, 3, 4, 4)
    calls = []

    def chunk_loss(rows_x, rows):
        calls.append(1)
        return (rows_x * 1e35).sum(), torch.zeros(2)  # x 2^16 overflows float32's range in backward

    gradient = photo_gradient(chunk_loss, x, chunk=2, loss_scale=2.0 ** 16)
    assert torch.isfinite(gradient.grad).all() and len(calls) > 1


def test_an_out_of_memory_step_is_retried_once_with_half_the_chunk(caplog):
    sizes = []

    def step(size):
        sizes.append(size)
        if size > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return size

    chunks = PhotoChunks(requested=4, photos=4, device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING):
        assert chunks.run(step) == 2
    assert sizes == [4, 2] and chunks.size == 2 and "retrying it with 2 photo(s)" in caplog.text
    single = PhotoChunks(requested=1, photos=4, device=torch.device("cpu"))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        single.run(lambda size: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("CUDA out of memory")))


def test_auto_takes_every_photo_at_once_on_a_cpu():
    assert PhotoChunks(0, 5, torch.device("cpu")).size == 5
    assert PhotoChunks(3, 5, torch.device("cpu")).size == 3 and PhotoChunks(9, 5, torch.device("cpu")).size == 5


def test_pgd_batch_gives_the_same_run_as_all_photos_at_once(monkeypatch):
    runs = {}
    for pgd_batch in (0, 1):
        config = tiny_config(pgd_batch=pgd_batch, iterations=2)
        denoiser = load_denoiser("tiny", config)
        scorer = IdentityEnsemble.from_reference([TinyRecognizer()], REFERENCE, LANDMARKS, config.tau)
        passes = []
        monkeypatch.setattr(iddm, "photo_gradient",
                            lambda *a, **k: passes.append(a[2]) or photo_gradient(*a, **k))
        runs[pgd_batch] = (run_iddm(denoiser, REFERENCE, PROTECTION, LANDMARKS, scorer, config), passes)
    (whole, whole_chunks), (single, single_chunks) = runs[0], runs[1]
    assert set(whole_chunks) == {2} and set(single_chunks) == {1}
    assert torch.allclose(single.decoupled, whole.decoupled, atol=1e-6)
    assert single.iterations[-1].stage2_score == pytest.approx(whole.iterations[-1].stage2_score, rel=1e-5)
    assert all(0 <= z < 0.5 for record in single.iterations for z in record.pgd_zero_grad)
