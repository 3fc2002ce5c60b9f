#!/usr/bin/env bash
# Creates ./.venv with everything the CLI, the demo and the tests need. Safe to re-run.
# On this project's machines torch 2.14.1 + torchvision 0.29.1 come from local files; elsewhere pip
# fetches them (or set IDDM_TORCH_SPEC to the build you want, e.g. a CUDA one).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${IDDM_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# (This machine's pip config lists local indexes; their "is ignored" warnings are noise.)
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    # shellcheck disable=SC2086
    pip install ${IDDM_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
fi
pip install -e ".[test]"
# facenet-pytorch pins torch<2.3 in its metadata: never let pip resolve its deps.
# insightface: only its sample photos are used (demo/tests); its heavy deps are not needed.
# onnx2torch (ArcFace from InsightFace packs) declares torchvision: same treatment.
pip install --no-deps "facenet-pytorch>=2.5" "insightface>=0.7" "onnx2torch>=1.5"
