#!/usr/bin/env bash
# Install (or update) the environment, then run the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV=${KVSQUEEZE_VENV:-.venv}
# --durations=10: the ten slowest tests at the end of every run, so the next person sees where the time goes
exec "$VENV/bin/python" -m pytest -ra --durations=10 "$@"
