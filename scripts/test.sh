#!/usr/bin/env bash
# The tests: sets up ./.venv, then runs pytest (CPU, tiny models, no downloads). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${IDDM_VENV:-.venv}/bin/python" -m pytest "$@"
