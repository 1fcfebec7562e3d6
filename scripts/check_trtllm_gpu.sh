#!/usr/bin/env bash
# On a CUDA machine with TensorRT-LLM installed: run the embedded model (or --model PATH) through each
# kvsqueeze method on TensorRT-LLM and compare with the dense engine. See docs/trtllm.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m kvsqueeze.backends.trtllm.check "$@"
