#!/usr/bin/env bash
# The main job on the embedded default: sets up ./.venv, then runs `iddm demo` (no GPU, no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${IDDM_VENV:-.venv}/bin/iddm" demo "$@"
