"""Issue 13, "The CLI, from a fresh clone": what a newcomer typing commands meets. Every mistake is
refused before any work with a message saying what was asked, what is there and what to do; no
traceback; the summary says where each output went and what each figure is."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, files_under, run_cli_here, train_argv


def run(argv) -> tuple[int, str, str]:
    return run_cli_here([str(a) for a in argv])


def refused(argv, *expected: str) -> str:
    """Runs `iddm ARGV`, which must stop with exit code 2 and a one-line answer naming `expected`."""
    code, out, err = run(argv)
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Errno" not in err, err
    for text in expected:
        assert text in err, err
    return err


# --- --device ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, expected", [
    ("cuda", "no usable NVIDIA GPU"), ("cuda:1", "no usable NVIDIA GPU"), ("mps", "Metal GPU (mps)"),
    ("cdua", "'cdua' is not a device; use cpu, cuda, cuda:N"), ("cpu:0", "'cpu:0' is not a device")])
def test_a_device_this_machine_lacks_says_what_exists_and_what_to_do(place, device, expected):
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has a GPU")
    if device == "cuda" and torch.version.cuda is None:
        expected = "built without CUDA"
    err = refused(train_argv(place.photos, place.lora, "--device", device), expected,
                  "This machine has: cpu.")
    assert "Use --device cpu" in err or "use cpu" in err
    assert not place.lora.exists()


def test_similarity_and_sweep_check_the_device_too(place, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    refused(["similarity", "--reference", place.photos, "--images", place.photos, "--device", "cuda"],
            "--device cuda")
    refused(["sweep", place.photos, "--out", tmp_path / "sweep", "--rho", "0.1", "--device", "cuda"],
            "--device cuda")
    assert not (tmp_path / "sweep").exists()


# --- --version, start-up --------------------------------------------------------------------------
def test_version_names_the_package_python_and_torch():
    from comfyui_iddm import __version__

    code, out, _ = run(["--version"])
    assert code == 0
    assert out.strip() == (f"iddm {__version__} (Python {'.'.join(map(str, sys.version_info[:3]))}, "
                           f"torch {torch.__version__})")


def test_importing_the_cli_loads_no_torch():
    """The console script imports the CLI before main() runs: that import must be quick and
    interrupt-free, so torch is imported only inside main()."""
    code = "import sys, comfyui_iddm.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0


def test_ctrl_c_while_starting_exits_130_without_a_traceback(monkeypatch):
    from comfyui_iddm import allocator

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(allocator, "keep_freed_memory", interrupted)
    code, _, err = run(["train", "photos", "--base", "tiny", "--out", "x.safetensors"])
    assert code == 130 and err.strip() == "interrupted while starting; nothing was done."


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_ctrl_c_while_torch_loads_exits_130_without_a_traceback(place):
    """A real Ctrl-C, sent while `iddm` (as the console script runs it) is loading torch's libraries."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; from comfyui_iddm.cli import main; sys.exit(main())",
                              *map(str, train_argv(place.photos, place.lora))], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if "libtorch" in Path(f"/proc/{child.pid}/maps").read_text():
                break
        except OSError:
            pass
        time.sleep(0.005)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err


# --- output paths: every one checked before training -------------------------------------------
def test_outputs_that_name_a_folder_or_a_file_of_the_wrong_kind_are_refused_before_training(place, tmp_path):
    folder, file = tmp_path / "a_folder", tmp_path / "a_file"
    folder.mkdir()
    file.write_text("x")
    err = refused(train_argv(place.photos, folder, "--overwrite"), f"{folder} is a folder",
                  f"{folder}/lora.safetensors")
    assert "--overwrite" not in err  # no overwrite can replace a folder: it is not suggested
    refused(train_argv(place.photos, folder), f"{folder} is a folder")
    refused(train_argv(place.photos, place.lora, "--report", folder, "--overwrite"), f"{folder} is a folder",
            "report.json")
    refused(train_argv(place.photos, place.lora, "--html", file), f"{file} is a file, not a folder")
    refused(train_argv(place.photos, place.lora, "--html", file / "page"), f"{file} is a file")
    refused(train_argv(place.photos, place.lora, "--decoupled-out", file), f"{file} is a file, not a folder")
    refused(train_argv(place.photos, place.lora, "--report", place.lora), "--report and --out both name")
    refused(train_argv(place.photos, place.lora, "--report", tmp_path / "page" / "report.html",
                       "--html", tmp_path / "page"), "is where --html writes its page")
    assert files_under(place.out) == set() and not (tmp_path / "page").exists()


def test_an_existing_page_is_refused_unless_overwrite_and_nothing_is_created_early(place, tmp_path):
    page = tmp_path / "page"
    page.mkdir()
    (page / "plot_identity.png").write_bytes(b"old plot")
    refused(train_argv(place.photos, place.lora, "--html", page), "plot_identity.png already exists")
    code, _, err = run(train_argv(place.photos, place.lora, "--html", page, "--overwrite"))
    assert code == 0, err
    assert (page / "report.html").is_file() and (page / "plot_identity.png").read_bytes() != b"old plot"


def test_an_interrupted_run_leaves_no_empty_html_or_decoupled_folder(place, tmp_path, monkeypatch):
    from comfyui_iddm import cli

    def interrupt(self, event):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.ProgressBar, "update", interrupt)
    code, _, err = run(train_argv(place.photos, place.lora, "--html", tmp_path / "page",
                                           "--decoupled-out", tmp_path / "xp", "--report", tmp_path / "r.json"))
    assert code == 130 and "interrupted: no LoRA was written" in err
    assert not (tmp_path / "page").exists() and not (tmp_path / "xp").exists()
    assert not (tmp_path / "r.json").exists()


# --- flags that used to be accepted silently ------------------------------------------------------
def test_a_missing_weights_dir_is_refused_by_every_command(place, tmp_path):
    missing = tmp_path / "no_such_folder"
    refused(train_argv(place.photos, place.lora, "--weights-dir", missing), f"--weights-dir {missing} does not exist")
    refused(["similarity", "--reference", place.photos, "--images", place.photos, "--weights-dir", missing],
            "does not exist")
    refused(["demo", "--out", tmp_path / "demo", "--weights-dir", missing], "does not exist")
    refused(["sweep", "--out", tmp_path / "sweep", "--rho", "0.3", "--weights-dir", missing], "does not exist")
    refused(train_argv(place.photos, place.lora, "--weights-dir", place.photos / "photo_00.png"), "is not a folder")
    assert not (tmp_path / "demo").exists() and not (tmp_path / "sweep").exists()


def test_resume_with_nothing_saved_is_refused(place):
    err = refused(train_argv(place.photos, place.lora, "--resume"), "--resume: no interrupted run of person.safetensors",
                  "without --resume")
    assert ".person.safetensors.iddm-state" in err and not place.lora.exists()


def test_a_state_folder_without_a_finished_iteration_neither_blocks_nor_resumes(place):
    """Killed while saving its first iteration: the folder holds nothing to continue from."""
    state = place.out / ".person.safetensors.iddm-state"
    (state / ".saving-abc").mkdir(parents=True)
    refused(train_argv(place.photos, place.lora, "--resume"), "no interrupted run")
    code, _, err = run(train_argv(place.photos, place.lora))
    assert code == 0, err
    assert files_under(place.out) == {"person.safetensors"}


@pytest.mark.parametrize("command", ["train", "sweep", "demo"])
def test_reference_zero_is_refused_not_taken_for_the_default(place, tmp_path, command):
    argv = {"train": train_argv(place.photos, place.lora),
            "sweep": ["sweep", place.photos, "--out", tmp_path / "s", "--rho", "0.3"],
            "demo": ["demo", "--out", tmp_path / "d"]}[command]
    refused([*argv, "--reference", "0"], "--reference 0: the reference set needs at least 1 photo")


def test_the_library_refuses_zero_reference_photos_too(place):
    from comfyui_iddm.photos import PhotoError
    from comfyui_iddm.pipeline import FolderOutputs, train_folder

    from conftest import tiny_config

    with pytest.raises(PhotoError, match="reference count 0"):
        train_folder(place.photos, "tiny", FolderOutputs(place.lora), tiny_config(), n_reference=0,
                     detector="none", evaluators=["tiny_test"])


def test_iddm_report_replaces_a_page_only_with_overwrite(tmp_path):
    report = {"config": {"rho": 0.3, "eta": 0.08}, "iterations": [], "identity": [],
              "decoupled": {"linf": 0.05, "psnr": 30.0, "ssim": 0.9}, "seconds_total": 1.0}
    source = tmp_path / "report.json"
    source.write_text(json.dumps(report))
    assert run(["report", source])[0] == 0
    page = tmp_path / "report.html"
    page.write_text("my edited page")
    refused(["report", source], f"{page} already exists")
    assert page.read_text() == "my edited page"
    code, out, _ = run(["report", source, "--overwrite"])
    assert code == 0 and f"report written: {page}" in out and page.read_text() != "my edited page"
    (tmp_path / "file").write_text("x")
    refused(["report", source, "--out", tmp_path / "file"], "is a file, not a folder")


# --- the summary ------------------------------------------------------------------------------------
def test_the_summary_says_where_each_output_went_and_labels_every_figure(place, tmp_path):
    code, out, err = run(train_argv(place.photos, place.lora, "--report", tmp_path / "r.json",
                                             "--html", tmp_path / "page", "--decoupled-out", tmp_path / "xp"))
    assert code == 0, err
    lines = out.splitlines()
    written = {line.split(" written:")[0]: line.split(" written:")[1].strip() for line in lines if " written:" in line}
    assert written == {"protected LoRA": str(place.lora), "JSON report": str(tmp_path / "r.json"),
                       "report page": str(tmp_path / "page" / "report.html"),
                       "protected photos X' (2 PNG)": str(tmp_path / "xp")}
    figures = next(line for line in lines if "PSNR" in line)
    assert "largest pixel change (L-inf)" in figures and " dB" in figures and "SSIM" in figures
    assert any("similarity to the person (cosine" in line for line in lines)
    assert any(line.strip().startswith("tiny_test (surrogate: attacked in training)") and "->" in line
               for line in lines)
    assert any(line.startswith("photos: 2 reference, 2 protected; training time ") and line.endswith(" s")
               for line in lines)
