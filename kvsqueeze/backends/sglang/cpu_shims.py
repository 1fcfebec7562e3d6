"""Shims that let stock SGLang 0.5.23 run on a CPU-only x86-64 machine.

Each shim is idempotent and touches only the running process: nothing in site-packages is edited.
They are applied by :func:`kvsqueeze.backends.sglang.plugin.load` (SGLang's ``sglang.srt.plugins``
entry point, run in the launcher, scheduler and detokenizer processes) through the patch helper
(:mod:`kvsqueeze.backends.sglang.patch`). The torchvision shim, which must precede the first
``import transformers``, is :mod:`kvsqueeze.compat`; it also runs at the top of kvsqueeze's launcher.

Why each one exists:

* ``native_rope``: SGLang's rotary embedding imports ``vllm._custom_ops`` on any non-CUDA device unless
  its module-level ``_is_cpu`` is true, and the official CPU switch (``SGLANG_USE_CPU_ENGINE=1``) demands
  the Intel-AMX ``sgl_kernel`` build, which has no wheel. Setting that module flag keeps the native
  PyTorch rope path, which is what runs anyway.
* ``hicache_host_pool``: the hierarchical cache's host pool allocates pinned memory (which needs an
  accelerator) and moves pages with ``sgl_kernel.kvcacheio.transfer_kv_direct``, which is only
  imported on CUDA/ROCm/XPU. On CPU the pool is made unpinned and ``transfer_kv_direct`` becomes the
  same indexed copy written in PyTorch (``--hicache-io-backend direct``, ``layer_first`` layout).
* ``prefix_extend``: the ``torch_native`` attention backend (the one that runs on CPU) computes an
  extend as if the whole sequence were new: it pads the new queries to the full sequence length
  (``per_req_query_redudant``) and runs causal attention over all of it, so a request whose prefix
  came from the radix cache or from storage pays the full prefill's attention again (profiled: ~1.7 s
  of a 4.5 s restore of a 2048-token prompt, 64 new tokens after a 1984-token cached prefix). The shim attends the new queries only, with the causal mask shifted by the prefix
  (query ``i`` sees keys ``0 .. prefix + i``); sequences without a prefix, with a sliding window or
  with an encoder take SGLang's own path. Same result up to float rounding (tested against
  SGLang's function).
* ``storage_wait_yield``: while a request waits for its prefix from a HiCache storage tier, SGLang's
  scheduler loop spins (``on_idle`` ends in ``time.sleep(0)`` so that the storage threads get the
  interpreter lock); on a GPU server that spin burns a spare host core, on a 2-core CPU server it
  takes one of the two cores the storage codec runs on. The shim sleeps 0.5 ms at the end of such an
  idle turn (CPU device, storage tier on, requests pending, nothing to run); a running batch is
  never delayed, since ``on_idle`` runs only when there is no batch.
* ``cpu_graphs`` (applied by an attention backend that implements SGLang's CPU graph hooks, DMS's):
  with ``--enable-torch-compile`` SGLang captures CPU decode graphs (``CPUGraphRunner``: the model's
  decode forward compiled per batch size, replayed with padded batches), but only on its CPU platform,
  which the AMX build demands; the platform this machine gets declares no graph capture, and the
  runner registers fake kernels for ``sgl_kernel`` CPU operators this build lacks (an error). The shim
  declares graph capture on that platform (on a machine without CUDA) and skips the fake kernels when
  ``sgl_kernel`` has no CPU operators (nothing would call them).
"""

from __future__ import annotations

import logging

from kvsqueeze.backends.sglang.patch import patch, provide, set_value
from kvsqueeze.compat import apply_pre_import

logger = logging.getLogger(__name__)


def native_rope() -> None:
    """Make SGLang's rotary embedding take its native PyTorch path on CPU."""
    import torch

    if torch.cuda.is_available():
        return
    from sglang.srt.layers.rotary_embedding import base

    set_value(base, "_is_cpu", "cpu_shims.native_rope", True)


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
    import torch

    if torch.cuda.is_available():
        return
    try:
        from sglang.srt.mem_cache.pool_host import mha
    except ImportError:  # an SGLang without this module: nothing to patch
        return
    provide(mha, "transfer_kv_direct", "cpu_shims.hicache_host_pool", transfer_kv_direct)  # CUDA/ROCm/XPU only

    def unpinned(init):
        def unpinned_init(self, *args, **kwargs):
            kwargs["pin_memory"] = False
            init(self, *args, **kwargs)
        return unpinned_init

    patch(mha.MHATokenToKVPoolHost, "__init__", "cpu_shims.hicache_host_pool", unpinned)


def _prefix_extend(original):
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    def run_sdpa_forward_extend(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                                seq_lens, extend_prefix_lens, extend_seq_lens, encoder_lens=None,
                                scaling=None, enable_gqa=False, causal=False, is_cross_attn=False,
                                sliding_window_size=None):
        if (encoder_lens is not None or not causal or is_cross_attn
                or (sliding_window_size is not None and sliding_window_size > -1)
                or int(extend_prefix_lens.max()) == 0):
            return original(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                            seq_lens, extend_prefix_lens, extend_seq_lens, encoder_lens, scaling=scaling,
                            enable_gqa=enable_gqa, causal=causal, is_cross_attn=is_cross_attn,
                            sliding_window_size=sliding_window_size)
        q_all = query.movedim(0, query.dim() - 2)  # [heads, tokens, dim]
        start_q = 0
        for i in range(seq_lens.shape[0]):
            n_new, prefix, n_kv = int(extend_seq_lens[i]), int(extend_prefix_lens[i]), int(seq_lens[i])
            end_q = start_q + n_new
            rows = req_to_token[req_pool_indices[i], :n_kv]
            q = q_all[:, start_q:end_q, :]
            k = k_cache[rows].movedim(0, query.dim() - 2)
            v = v_cache[rows].movedim(0, query.dim() - 2)
            if not (q.dtype == k.dtype == v.dtype):
                k, v = k.to(q.dtype), v.to(q.dtype)
            if prefix == 0:
                mask, is_causal = None, True
            else:  # query j (absolute prefix + j) sees keys 0 .. prefix + j
                mask = (torch.arange(n_kv, device=q.device)[None, :]
                        <= prefix + torch.arange(n_new, device=q.device)[:, None])
                is_causal = False
            out = scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                               attn_mask=mask, enable_gqa=enable_gqa, scale=scaling,
                                               is_causal=is_causal)
            output[start_q:end_q] = out.squeeze(0).movedim(query.dim() - 2, 0)
            start_q = end_q
        return output

    return run_sdpa_forward_extend


def prefix_extend() -> None:
    """Extend attention over the new tokens only, not the cached prefix again (``torch_native``)."""
    try:
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    except ImportError:  # an SGLang without this backend: nothing to patch
        return
    patch(TorchNativeAttnBackend, "_run_sdpa_forward_extend", "cpu_shims.prefix_extend", _prefix_extend)


def _yielding_on_idle(original, pause: float = 0.0005):
    import time

    def on_idle(self):
        original(self)
        if (getattr(self, "enable_hicache_storage", False)
                and getattr(self.server_args, "device", None) == "cpu" and not self.is_fully_idle()):
            time.sleep(pause)

    return on_idle


def storage_wait_yield() -> None:
    """Sleep 0.5 ms per idle scheduler turn while requests wait for storage (CPU servers only)."""
    try:
        from sglang.srt.managers.scheduler import Scheduler
    except ImportError:
        return
    patch(Scheduler, "on_idle", "cpu_shims.storage_wait_yield", _yielding_on_idle)


def cpu_graphs() -> None:
    """Let ``--enable-torch-compile`` capture SGLang's CPU decode graphs without the AMX build."""
    import msgspec
    import torch

    if torch.cuda.is_available():
        return
    from sglang.srt.model_executor import cpu_graph_runner
    from sglang.srt.platforms.interface import SRTPlatform

    key = "cpu_shims.cpu_graphs"
    if not SRTPlatform.capabilities.graph_capture:
        set_value(SRTPlatform, "capabilities", key,
                  msgspec.structs.replace(SRTPlatform.capabilities, graph_capture=True))
    if not hasattr(torch.ops.sgl_kernel, "shm_allreduce"):  # no sgl_kernel CPU operators in this build
        patch(cpu_graph_runner, "register_fake_ops", key, lambda register: (lambda tp_size: None),
              chains=False, why="the fake kernels are for sgl_kernel CPU operators this build does not "
              "have (registering them fails); nothing calls them")


def apply_all() -> None:
    apply_pre_import()
    native_rope()
    hicache_host_pool()
    prefix_extend()
    storage_wait_yield()
