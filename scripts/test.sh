#!/usr/bin/env bash
# Install (or update) the environment, then run the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV=${KVSQUEEZE_VENV:-.venv}
exec "$VENV/bin/python" -m pytest -ra "$@"
