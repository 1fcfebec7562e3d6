"""Triton kernels, each beside its PyTorch reference (the CPU path and the test oracle)."""

from __future__ import annotations

import importlib.util


def use_triton(t) -> bool:
    """Whether a kernel should run its Triton version for tensor ``t``: on CUDA, with Triton present."""
    return bool(t.is_cuda) and importlib.util.find_spec("triton") is not None
