#!/usr/bin/env bash
# Creates ./.venv with everything the CLI, the demo and the tests need. Safe to re-run: once set up,
# and until pyproject.toml or this script change, it only checks and returns (under a second).
#
# torch is most of the first run. With IDDM_TORCH_SPEC set, that is what is installed. Otherwise, on
# a machine without an NVIDIA GPU, a CPU build of torch (the venv is then about 2 GB instead of 6.4) is
# taken from PyTorch's CPU wheel index (IDDM_TORCH_CPU_INDEX; empty = do not try) when that index can
# be reached and offers the pinned versions; failing that, and with an NVIDIA GPU, pip installs the
# pinned versions from its usual sources (on this project's machines: local files, a CUDA build).
# Progress goes to stderr, with the elapsed time and the venv's size while torch installs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${IDDM_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
CPU_INDEX=${IDDM_TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}
STAMP="$VENV/.iddm-setup"
START=$SECONDS

elapsed() { local s=$((SECONDS - START)); printf '%d:%02d' $((s / 60)) $((s % 60)); }
say() { printf '[setup %s] %s\n' "$(elapsed)" "$*" >&2; }
venv_size() { du -sh "$VENV" 2>/dev/null | cut -f1; }
# (This machine's pip config lists local indexes; their "is ignored" warnings are noise.)
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
# A line every IDDM_SETUP_TICK seconds while a long step runs, so a first run is never silent.
with_heartbeat() {
    local what=$1 rc=0 hb
    shift
    (while sleep "${IDDM_SETUP_TICK:-20}"; do say "  ... $what ($(venv_size) in $VENV so far)"; done) &
    hb=$!
    "$@" || rc=$?
    kill "$hb" 2>/dev/null || true
    wait "$hb" 2>/dev/null || true
    return "$rc"
}
has_nvidia_gpu() {
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "GPU"; then
        return 0
    fi
    [ -e /proc/driver/nvidia/version ]
}
# One quick look (5 s at most) whether the CPU index answers and lists torch: pip itself would retry
# an unreachable index five times for every package it resolves.
offers_torch() {
    "$VENV/bin/python" - "$1" <<'PY' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5) as page:
    sys.exit(0 if b"torch-" in page.read(1 << 20) else 1)
PY
}
fingerprint() { cat pyproject.toml scripts/setup.sh | cksum | cut -d' ' -f1; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(fingerprint)" ] \
        && "$VENV/bin/python" -c "import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ('torch', 'torchvision', 'comfyui_iddm')))" 2>/dev/null; then
    exit 0  # set up, and nothing it depends on changed
fi

say "setting up $VENV (first run: a few minutes; later runs: seconds)"
if [ ! -x "$VENV/bin/python" ]; then
    say "[1/4] creating the virtual environment with $PY"
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    extra=()
    if [ -n "${IDDM_TORCH_SPEC:-}" ]; then
        spec=$IDDM_TORCH_SPEC
        say "[2/4] installing torch as IDDM_TORCH_SPEC says: $spec"
    elif has_nvidia_gpu; then
        spec=$TORCH_PINS
        say "[2/4] installing torch with CUDA for the NVIDIA GPU here ($spec): about 5.5 GB"
    else
        spec=$TORCH_PINS
        if [ -n "$CPU_INDEX" ] && offers_torch "$CPU_INDEX"; then
            extra=(--extra-index-url "$CPU_INDEX")
            say "[2/4] installing torch ($spec): no NVIDIA GPU here, so its CPU build from $CPU_INDEX" \
                "(torch about 0.8 GB instead of 5.5; pip keeps the default build if that index lacks these versions)"
        elif [ -n "$CPU_INDEX" ]; then
            say "[2/4] installing torch ($spec): no NVIDIA GPU here, but $CPU_INDEX (CPU builds) cannot be" \
                "reached, so the default build (with CUDA libraries: about 5.5 GB, a few minutes)"
        else
            say "[2/4] installing torch ($spec): the default build (IDDM_TORCH_CPU_INDEX is empty)"
        fi
    fi
    # shellcheck disable=SC2086
    with_heartbeat "installing torch" pip install ${extra[@]+"${extra[@]}"} $spec
    say "      $("$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'installed:',
        'CUDA ' + torch.version.cuda + ' build' if torch.version.cuda else 'CPU build')")"
else
    say "[2/4] torch is already installed"
fi
say "[3/4] installing the pack and its test tools (pip install -e .[test])"
with_heartbeat "installing the pack" pip install -q -e ".[test]"
# facenet-pytorch pins torch<2.3 in its metadata: never let pip resolve its deps.
# insightface: only its sample photos are used (demo/tests); its heavy deps are not needed.
# onnx2torch (ArcFace from InsightFace packs) declares torchvision: same treatment.
say "[4/4] installing facenet-pytorch, insightface and onnx2torch without their dependencies"
pip install -q --no-deps "facenet-pytorch>=2.5" "insightface>=0.7" "onnx2torch>=1.5"
fingerprint > "$STAMP"
say "done: $VENV is $(venv_size)"
