#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU and no internet: IDDM at the paper's schedule on a
# real-size SD 1.5 with random weights (built once into ~/.cache/comfyui-iddm/bench), through the
# diffusers door (the CLI's path), half precision against float32, and with $COMFYUI_PATH set the
# ComfyUI door. Prints seconds per identity and peak VRAM. See benchmarks/gpu_check.py for the parts.
#
#   bash benchmarks/gpu_check.sh [--ft-steps N] [--gradient-checkpointing on|off] [--json]
#   bash benchmarks/gpu_check.sh --cpu-smoke    # the same steps on the CPU at toy size
#
# Python: $PYTHON, else the repository's .venv (bash scripts/setup.sh makes it).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
if [ ! -x "$python" ]; then
    echo "no Python at $python: run 'bash scripts/setup.sh' or set PYTHON" >&2
    exit 1
fi
if [ "${1:-}" = "--cpu-smoke" ]; then
    shift
    set -- --device cpu --size smoke "$@"
fi
exec "$python" "$here/gpu_check.py" "$@"
