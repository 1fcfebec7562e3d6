"""The TensorRT-LLM adapter (PyTorch backend). See docs/trtllm.md for the support matrix.

TensorRT-LLM cannot be installed on this project's CPU machines, so this package is split in two:
engine-agnostic logic (block layouts, chained block hashes, the KVTC block cache, block-table
remapping for fused blocks) that imports nothing from TensorRT-LLM and is tested here, and thin
subclasses of TensorRT-LLM's own classes, created only when ``tensorrt_llm`` imports (module
``__getattr__``), which ``scripts/check_trtllm_gpu.sh`` exercises on a GPU machine.
"""

from __future__ import annotations

from kvsqueeze.errors import KvsqueezeError

# Versions the adapter is written against (docs/trtllm.md): the KV cache connector API
# (KvCacheConnectorScheduler / KvCacheConnectorWorker, `llm_args`-based constructors) is 1.1+.
MIN_VERSION = (1, 1)


def version() -> tuple[int, ...] | None:
    """TensorRT-LLM's version as a tuple, or None when it is not importable."""
    try:
        import tensorrt_llm
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    parts = []
    for p in str(getattr(tensorrt_llm, "__version__", "0")).split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def require(feature: str) -> tuple[int, ...]:
    """Raise a clear error unless a usable TensorRT-LLM is importable; returns its version."""
    v = version()
    if v is None:
        raise KvsqueezeError(
            f"{feature}: needs TensorRT-LLM (`import tensorrt_llm` failed); expected a CUDA machine "
            "with TensorRT-LLM >= 1.1 installed (see docs/trtllm.md and docker/trtllm-gpu.Dockerfile)")
    if v[:2] < MIN_VERSION:
        raise KvsqueezeError(f"{feature}: TensorRT-LLM {'.'.join(map(str, v))} found; expected "
                             f">= {'.'.join(map(str, MIN_VERSION))}")
    return v
