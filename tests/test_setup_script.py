"""scripts/setup.sh, the first thing a fresh clone runs: it says what it is doing while it works,
takes a CPU build of torch when there is no NVIDIA GPU (where the index offers one), honours
IDDM_TORCH_SPEC, and returns at once when nothing changed.

Runs the real script against a stand-in venv whose `python` records what it is asked to do, so no
package is installed and nothing is downloaded."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PINS = "torch==2.14.1 torchvision==0.29.1"

# A venv python that logs its arguments; "torch" counts as installed once pip installed it.
STUB_PYTHON = """#!/usr/bin/env bash
venv="$(cd "$(dirname "$0")/.." && pwd)"
echo "$*" >> "$venv/calls.log"
case "$1" in
  -m) case "$*" in *torch==*|*IDDM_SPEC_MARK*) sleep "${STUB_PIP_SECONDS:-0}"; touch "$venv/torch-installed";; esac
      exit 0;;
  -) cat > /dev/null; [ -n "${STUB_CPU_INDEX_UP:-}" ];;  # the CPU-index probe: up only when told
  -c) case "$2" in
        *print*) echo "torch 2.14.1 installed: CPU build";;
        *find_spec*) [ -e "$venv/torch-installed" ] && [ -e "$venv/pack-installed-ok" ];;
        *) [ -e "$venv/torch-installed" ];;
      esac;;
esac
"""


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def stub_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    executable(venv / "bin" / "python", STUB_PYTHON)
    return venv


def run_setup(venv: Path, tmp_path: Path, gpu: bool = False, **env) -> subprocess.CompletedProcess:
    if not gpu and (Path("/proc/driver/nvidia/version").exists()):
        pytest.skip("this machine has an NVIDIA driver: the no-GPU path cannot be exercised")
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    if gpu:
        executable(bin_dir / "nvidia-smi", "#!/bin/sh\necho 'GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-0)'\n")
    path = os.pathsep.join([str(bin_dir)] + [p for p in os.environ["PATH"].split(os.pathsep)
                                               if not (Path(p) / "nvidia-smi").exists()])
    inherited = {k: v for k, v in os.environ.items() if k not in ("IDDM_TORCH_SPEC", "IDDM_TORCH_CPU_INDEX")}
    full_env = {**inherited, "PATH": path, "IDDM_VENV": str(venv), "IDDM_SETUP_TICK": "1", **env}
    return subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], env=full_env, capture_output=True,
                          text=True, timeout=120)


def torch_install(venv: Path) -> str:
    calls = (venv / "calls.log").read_text().splitlines()
    installs = [c for c in calls if c.startswith("-m pip") and "-e" not in c.split() and "--no-deps" not in c]
    assert len(installs) == 1, calls
    return installs[0]


def test_no_gpu_asks_for_the_cpu_build_and_says_what_it_does(stub_venv, tmp_path):
    done = run_setup(stub_venv, tmp_path, STUB_PIP_SECONDS="2.5", STUB_CPU_INDEX_UP="1")
    assert done.returncode == 0, done.stderr
    assert f"--extra-index-url {CPU_INDEX} {PINS}" in torch_install(stub_venv)
    steps = [line for line in done.stderr.splitlines() if line.startswith("[setup ")]
    for step in ("[2/4]", "[3/4]", "[4/4]"):  # [1/4] creates the venv, which exists here
        assert any(step in line for line in steps), done.stderr
    assert any("no NVIDIA GPU here, so its CPU build" in line for line in steps)
    assert any("... installing torch" in line for line in steps), "a heartbeat while torch installs"
    assert any("CPU build" in line and "installed" in line for line in steps)
    assert steps[-1].split("] ", 1)[1].startswith("done:")


def test_an_unreachable_cpu_index_is_tried_once_then_the_default_build_is_installed(stub_venv, tmp_path):
    """pip would retry an unreachable index five times for every package: the script looks once."""
    done = run_setup(stub_venv, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--extra-index-url" not in torch_install(stub_venv)
    assert "cannot be reached, so the default build" in done.stderr


def test_with_an_nvidia_gpu_the_default_build_is_installed(stub_venv, tmp_path):
    done = run_setup(stub_venv, tmp_path, gpu=True, STUB_CPU_INDEX_UP="1")
    assert done.returncode == 0, done.stderr
    install = torch_install(stub_venv)
    assert PINS in install and "--extra-index-url" not in install
    assert "NVIDIA GPU" in done.stderr


def test_an_empty_cpu_index_falls_back_to_the_default_build(stub_venv, tmp_path):
    done = run_setup(stub_venv, tmp_path, IDDM_TORCH_CPU_INDEX="", STUB_CPU_INDEX_UP="1")
    assert done.returncode == 0, done.stderr
    assert "--extra-index-url" not in torch_install(stub_venv)


def test_iddm_torch_spec_is_installed_as_given(stub_venv, tmp_path):
    done = run_setup(stub_venv, tmp_path, IDDM_TORCH_SPEC="torch IDDM_SPEC_MARK --index-url https://example.invalid/cu",
                     STUB_CPU_INDEX_UP="1")
    assert done.returncode == 0, done.stderr
    install = torch_install(stub_venv)
    assert install.endswith("torch IDDM_SPEC_MARK --index-url https://example.invalid/cu")
    assert CPU_INDEX not in install


def test_a_second_run_returns_at_once_when_nothing_changed(stub_venv, tmp_path):
    assert run_setup(stub_venv, tmp_path).returncode == 0
    (stub_venv / "pack-installed-ok").touch()  # the stand-in now imports torch and the pack
    (stub_venv / "calls.log").unlink()
    again = run_setup(stub_venv, tmp_path)
    assert again.returncode == 0 and again.stderr == ""
    assert not any(c.startswith("-m pip") for c in (stub_venv / "calls.log").read_text().splitlines())
