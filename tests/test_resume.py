"""Interrupts and resume (issue 5): a cancelled or interrupted run leaves no LoRA and an older LoRA
untouched; --resume continues from the last finished iteration to the same LoRA as an uninterrupted
run; the private state folder is deleted on success; a resume with other settings is refused."""
from __future__ import annotations

import signal

import pytest
import torch

from comfyui_iddm.backends.diffusers_backend import load_denoiser
from comfyui_iddm.faces.ensemble import IdentityEnsemble
from comfyui_iddm.iddm import Cancelled, run_iddm
from comfyui_iddm.lora_io import load_lora
from comfyui_iddm.pipeline import FolderOutputs, train_folder
from comfyui_iddm.run_state import StateMismatchError

from conftest import (TinyRecognizer, files_under, run_cli, run_cli_here, synthetic_photos, tiny_config,
                      train_argv)

PHOTOS = synthetic_photos(4, 64, seed=2)
REFERENCE, PROTECTION = PHOTOS[:2], PHOTOS[2:]
LANDMARKS = torch.tensor([[[22.0, 30.0], [42.0, 30.0], [32.0, 40.0], [24.0, 50.0], [40.0, 50.0]]]).repeat(2, 1, 1)
CONFIG = tiny_config(iterations=3, ft_steps=2, pgd_steps=2, rho=0.5)
STEPS_PER_ITERATION = 2 * 2 + 2


def engine_run(state_dir=None, config=CONFIG, protection=PROTECTION, **kwargs):
    denoiser = load_denoiser("tiny", config)
    scorer = IdentityEnsemble.from_reference([TinyRecognizer()], REFERENCE, LANDMARKS, config.tau)
    return run_iddm(denoiser, REFERENCE, protection, LANDMARKS, scorer, config, state_dir=state_dir, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted():
    return engine_run()


def cancel_after(steps: int):
    events = []
    return events, dict(on_progress=events.append, should_cancel=lambda: len(events) >= steps)


@pytest.mark.parametrize("cancel_at", [STEPS_PER_ITERATION + 3, 2 * STEPS_PER_ITERATION + 1])
def test_resume_continues_from_the_last_finished_iteration_to_the_same_result(tmp_path, uninterrupted, cancel_at):
    state = tmp_path / "state"
    _, hooks = cancel_after(cancel_at)
    with pytest.raises(Cancelled):
        engine_run(state, **hooks)
    finished = (cancel_at - 1) // STEPS_PER_ITERATION
    assert sorted(p.name for p in state.iterdir()) == [f"iteration-{finished:04d}"]

    events = []
    resumed = engine_run(state, on_progress=events.append)
    assert events[0].iteration == finished + 1 and events[0].done == finished * STEPS_PER_ITERATION + 1
    assert len(events) == (CONFIG.iterations - finished) * STEPS_PER_ITERATION
    assert resumed.lora.keys() == uninterrupted.lora.keys()
    for key in uninterrupted.lora:
        assert torch.equal(resumed.lora[key], uninterrupted.lora[key]), key
    assert torch.equal(resumed.decoupled, uninterrupted.decoupled)
    assert [r.stage2_score for r in resumed.iterations] == [r.stage2_score for r in uninterrupted.iterations]


def test_a_resume_with_other_settings_is_refused(tmp_path):
    state = tmp_path / "state"
    _, hooks = cancel_after(STEPS_PER_ITERATION + 1)
    with pytest.raises(Cancelled):
        engine_run(state, **hooks)
    with pytest.raises(StateMismatchError, match=r"used different settings \(eta, rho\); resume with the same "
                                                 r"settings, or delete that folder to start over"):
        engine_run(state, CONFIG.replace(rho=1.0, eta=0.05))


def test_a_resume_with_other_photos_is_refused(tmp_path):
    state = tmp_path / "state"
    _, hooks = cancel_after(STEPS_PER_ITERATION + 1)
    with pytest.raises(Cancelled):
        engine_run(state, **hooks)
    other = synthetic_photos(2, 64, seed=99)
    with pytest.raises(StateMismatchError, match="was made from other photos; resume with the same photos, or "
                                                 "delete that folder to start over"):
        engine_run(state, protection=other)


# --- the folder pipeline and the CLI -------------------------------------------------------------


def test_cancel_leaves_no_lora_and_an_older_lora_untouched(place):
    place.lora.write_bytes(b"older LoRA")
    events = []
    with pytest.raises(Cancelled):
        train_folder(place.photos, "tiny", FolderOutputs(place.lora, place.out / "xp", place.out / "r.json", True),
                     tiny_config(iterations=2), detector="none", evaluators=["tiny_test"],
                     on_progress=events.append, should_cancel=lambda: len(events) >= 3)
    assert place.lora.read_bytes() == b"older LoRA"
    visible = {p for p in files_under(place.out) if not p.startswith(".person.safetensors.iddm-state")}
    assert visible == {"person.safetensors"}


def test_ctrl_c_exits_130_keeps_the_state_and_resume_gives_the_uninterrupted_lora(place, tmp_path):
    argv = train_argv(place.photos, place.lora, "--iterations", "3")
    reference = tmp_path / "reference.safetensors"
    assert run_cli_here(train_argv(place.photos, reference, "--iterations", "3"))[0] == 0

    code, stderr = interrupt_at(argv, "iteration 2 stage1")
    assert code == 130, stderr
    assert "interrupted: no LoRA was written" in stderr and "--resume" in stderr
    assert not place.lora.exists()
    state = place.out / ".person.safetensors.iddm-state"
    assert sorted(p.name for p in state.iterdir()) == ["iteration-0001"]

    code, _, err = run_cli_here(argv)  # without --resume: refused, state kept
    assert code == 2 and "an unfinished run for person.safetensors was found" in err and "--resume" in err
    code, _, err = run_cli_here([*argv, "--resume"])
    assert code == 0, err
    assert "[9/24] iteration 2 finetune_reference" in err and "iteration 1" not in err  # resumed at k=2
    assert files_under(place.out) == {"person.safetensors"}  # the state folder is gone
    resumed, expected = load_lora(place.lora)[0], load_lora(reference)[0]
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_after_a_failed_final_write_resume_writes_without_training_again(place, monkeypatch):
    import errno

    from pathlib import Path

    real = Path.write_bytes

    def lora_disk_full(self, data):
        if self.name.startswith(f".{place.lora.name}.") and self.suffix == ".tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", lora_disk_full)
    argv = train_argv(place.photos, place.lora, "--report", place.out / "r.json")
    code, _, err = run_cli_here(argv)
    assert code == 2 and "--resume --overwrite" in err
    monkeypatch.setattr(Path, "write_bytes", real)
    code, _, err = run_cli_here([*argv, "--resume", "--overwrite"])
    assert code == 0, err
    assert "iteration" not in err  # no step ran again
    assert files_under(place.out) == {"person.safetensors", "r.json"}


def test_ctrl_c_before_any_iteration_finished_says_nothing_was_kept(place):
    code, stderr = interrupt_at(train_argv(place.photos, place.lora, "--iterations", "2"), "iteration 1 stage1")
    assert code == 130, stderr
    assert "no iteration had finished, so nothing was kept" in stderr and "--resume" not in stderr
    assert not place.lora.exists()


def interrupt_at(argv, progress_line: str) -> tuple[int, str]:
    """Runs the CLI in a child process and sends Ctrl-C when stderr shows `progress_line`
    (one progress line per phase when stderr is not a terminal); returns (exit code, stderr)."""
    child = run_cli(argv, wait=False)
    lines = []
    for line in child.stderr:
        lines.append(line)
        if progress_line in line:
            child.send_signal(signal.SIGINT)
            break
    stderr = "".join(lines) + child.stderr.read()
    return child.wait(timeout=120), stderr
