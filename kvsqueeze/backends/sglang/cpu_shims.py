"""Shims that let stock SGLang 0.5.23 run on a CPU-only x86-64 machine.

Each shim is idempotent and touches only the running process: nothing in site-packages is edited.
They are applied by :func:`kvsqueeze.backends.sglang.plugin.load` (SGLang's ``sglang.srt.plugins``
entry point, run in the launcher, scheduler and detokenizer processes) and, because the torchvision
shim must precede the first ``import transformers``, also at the top of kvsqueeze's own launcher.

Why each one exists (see ../shared/SGLANG-ON-CPU.md in the project notes):

* ``torchvision_ops``: the registry's torchvision wheel that ``timm`` pulls in is built against a CUDA
  torch; on the CPU torch its import fails with ``operator torchvision::nms does not exist`` because
  its fake-tensor registrations refer to ops its C++ library never registered here. SGLang and
  transformers import torchvision for vision models we never load; declaring the two op schemas makes
  the import succeed. The ops are declared, never implemented: calling them raises.
* ``native_rope``: SGLang's rotary embedding imports ``vllm._custom_ops`` on any non-CUDA device unless
  its module-level ``_is_cpu`` is true, and the official CPU switch (``SGLANG_USE_CPU_ENGINE=1``) demands
  the Intel-AMX ``sgl_kernel`` build, which has no wheel. Setting that module flag keeps the native
  PyTorch rope path, which is what runs anyway.
* ``hicache_host_pool``: the hierarchical cache's host pool allocates pinned memory (which needs an
  accelerator) and moves pages with ``sgl_kernel.kvcacheio.transfer_kv_direct``, which is only
  imported on CUDA/ROCm/XPU. On CPU the pool is made unpinned and ``transfer_kv_direct`` becomes the
  same indexed copy written in PyTorch (``--hicache-io-backend direct``, ``layer_first`` layout).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_TORCHVISION_LIB = None  # keeps the torch.library.Library alive for the life of the process
_applied: set[str] = set()


def _torchvision_needs_shim() -> bool:
    """Whether torchvision's compiled ops cannot load beside this torch (the registry's torchvision
    beside the CPU torch): then its Python side needs the op schemas declared. Loading its library is
    what ``import torchvision`` does first; where that works (a matching GPU build), no shim."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    libs = sorted(Path(spec.submodule_search_locations[0]).glob("_C*.so"))
    if libs:
        try:
            torch.ops.load_library(str(libs[0]))
        except (OSError, RuntimeError):
            pass
    try:
        return not torch._C._dispatch_has_kernel_for_dispatch_key("torchvision::nms", "CPU")
    except RuntimeError:  # op unknown to the dispatcher: the C++ part never loaded
        return True


def torchvision_ops() -> None:
    """Declare ``torchvision::nms`` / ``torchvision::qnms`` so ``import torchvision`` succeeds."""
    global _TORCHVISION_LIB
    if "torchvision_ops" in _applied:
        return
    _applied.add("torchvision_ops")
    import sys

    if "torchvision" in sys.modules or not _torchvision_needs_shim():
        return
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        try:
            lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already defined (a CPU torchvision that works)
            pass
    _TORCHVISION_LIB = lib
    logger.debug("kvsqueeze: declared torchvision::nms/qnms schemas for the CPU torch")


def native_rope() -> None:
    """Make SGLang's rotary embedding take its native PyTorch path on CPU."""
    if "native_rope" in _applied:
        return
    import torch

    if torch.cuda.is_available():
        _applied.add("native_rope")
        return
    from sglang.srt.layers.rotary_embedding import base

    base._is_cpu = True
    _applied.add("native_rope")


def transfer_kv_direct(src_layers, dst_layers, src_indices, dst_indices, page_size: int) -> None:
    """PyTorch twin of ``sgl_kernel.kvcacheio.transfer_kv_direct``: ``dst[dst_idx] = src[src_idx]``
    for every (source, destination) layer buffer pair (token rows; pages are whole runs of rows)."""
    if len(src_layers) != len(dst_layers):
        raise ValueError(f"{len(src_layers)} source and {len(dst_layers)} destination layers")
    if src_indices.numel() != dst_indices.numel():
        raise ValueError(f"{src_indices.numel()} source and {dst_indices.numel()} destination indices")
    if not src_layers:
        return
    import torch

    si = src_indices.to(device=src_layers[0].device, dtype=torch.long)
    di = dst_indices.to(device=dst_layers[0].device, dtype=torch.long)
    for src, dst in zip(src_layers, dst_layers):
        dst.index_copy_(0, di, src.index_select(0, si).to(dst.device))


def hicache_host_pool() -> None:
    """Unpinned host pool and a PyTorch ``transfer_kv_direct`` for HiCache on CPU."""
    if "hicache_host_pool" in _applied:
        return
    import torch

    _applied.add("hicache_host_pool")
    if torch.cuda.is_available():
        return
    try:
        from sglang.srt.mem_cache.pool_host import mha
    except ImportError:  # an SGLang without this module: nothing to patch
        return
    if not hasattr(mha, "transfer_kv_direct"):
        mha.transfer_kv_direct = transfer_kv_direct
    init = mha.MHATokenToKVPoolHost.__init__

    def unpinned_init(self, *args, **kwargs):
        kwargs["pin_memory"] = False
        init(self, *args, **kwargs)

    if not getattr(init, "_kvsqueeze_unpinned", False):
        unpinned_init._kvsqueeze_unpinned = True
        mha.MHATokenToKVPoolHost.__init__ = unpinned_init


def apply_pre_import() -> None:
    """Shims that must run before sglang or transformers are imported."""
    torchvision_ops()


def apply_all() -> None:
    apply_pre_import()
    native_rope()
    hicache_host_pool()
