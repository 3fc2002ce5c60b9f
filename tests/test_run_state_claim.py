"""Leftover run state (after Cancel or a crash) is continued, discarded on request, or refused."""
from __future__ import annotations

import pytest

from comfyui_iddm.run_state import StateExistsError, claim_state_dir, private_run_dir


def test_a_leftover_run_is_refused_unless_resumed_or_started_over(tmp_path):
    state = tmp_path / "state"
    (state / "iteration-0001").mkdir(parents=True)
    with pytest.raises(StateExistsError, match="unfinished run for me.safetensors.*turn on resume"):
        claim_state_dir(state, resume=False, start_over=False, what="me.safetensors",
                        how="turn on resume to continue it, or overwrite to start over.")
    assert (state / "iteration-0001").is_dir()  # refused, not lost
    assert claim_state_dir(state, True, False, "x", "") == state and (state / "iteration-0001").is_dir()
    claim_state_dir(state, resume=False, start_over=True, what="x", how="")
    assert not state.exists()
    assert claim_state_dir(tmp_path / "fresh", False, False, "x", "") == tmp_path / "fresh"


def test_node_runs_keep_state_in_the_users_cache_never_a_served_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.platform", "linux")
    assert private_run_dir("iddm_x.safetensors") == tmp_path / "cache" / "comfyui-iddm" / "runs" / "iddm_x.safetensors"
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="not a plain file name"):
            private_run_dir(bad)
