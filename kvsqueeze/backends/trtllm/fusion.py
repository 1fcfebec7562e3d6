"""Block fusion on TensorRT-LLM: attention reads shared, ref-counted fused blocks through remapped tables.

Engine-agnostic part (imports nothing from TensorRT-LLM; tested on CPU):

- :func:`block_keys`: the keys of pool blocks over the decision layers, from per-layer pool buffers
  laid out as ``KVCacheManager.get_buffers`` gives them (``[blocks, 2, tokens_per_block, kv_heads,
  head_dim]``);
- :class:`FusedBlockTables`: after a request's prefill, its new *full* blocks are checked against the
  live representatives at the same block index (:class:`kvsqueeze.methods.fusion.online.OnlinePageFusion`,
  the rule the SGLang adapter runs); a block that fuses is served from its representative: the
  request's table handed to attention points there, and the representative gains a reference
  (:class:`kvsqueeze.methods.fusion.refs.PageRefs`).

What TensorRT-LLM 1.2 allows, and what follows. Its C++ block manager allocates and frees a
sequence's blocks as a whole and has no call that releases one block of a live sequence or points two
sequences' tables at one block. So here a fused block's own physical block stays allocated (it keeps
the request's original KV), and only the *read* path is remapped. That makes the remap always safe to
undo: when a representative's owner finishes (and the engine frees and may reuse that block), every
table that pointed at it is pointed back at its own block (:meth:`FusedBlockTables.finish`). Memory is
therefore not reclaimed on 1.2.x; the same tables and reference counts are what a manager that can
release blocks (``KVCacheManagerV2``) needs, where a fused block would be freed instead of shadowed.
Only full blocks written by prefill are fused (decode writes the last, partial block), and blocks the
engine already shares through its own prefix reuse are left alone.

TensorRT-LLM part (created on first access when ``tensorrt_llm`` imports; unverified here):
``FusedBlockKVCacheManager``, a ``KVCacheManager`` subclass whose ``get_batch_cache_indices`` returns
the remapped tables (what the FLASHINFER attention metadata reads per block; VANILLA keeps a
sequence in one block, so there is nothing to remap), which fuses a request's
prompt blocks in ``update_resources`` once its last context chunk ran, and which undoes remaps in
``free_resources``. :func:`install` makes TensorRT-LLM's executor construct it (it replaces the
``KVCacheManager`` name in ``tensorrt_llm._torch.pyexecutor._util``), configured by ``KVSQUEEZE_FUSION``
(a :class:`~kvsqueeze.methods.fusion.config.FusionConfig` as JSON, as for SGLang; defaults without it).
"""

from __future__ import annotations

import os

import torch

from kvsqueeze.errors import bad_value
from kvsqueeze.methods.fusion.config import DEFAULT_SIMILARITY, FusionConfig, parse_layers
from kvsqueeze.methods.fusion.online import OnlinePageFusion

CONFIG_ENV = "KVSQUEEZE_FUSION"


def block_keys(buffers: list[torch.Tensor], block_ids: list[int], layers: list[int]) -> torch.Tensor:
    """Keys ``[n, len(layers), tokens, kv_heads * head_dim]`` of ``block_ids`` (float32)."""
    out = []
    for layer in layers:
        buf = buffers[layer]
        if buf.dim() != 5 or buf.shape[1] != 2:
            raise bad_value("buffers", tuple(buf.shape), "[blocks, 2 (K, V), tokens, kv_heads, head_dim]")
        k = buf[torch.as_tensor(block_ids, dtype=torch.long, device=buf.device), 0]
        out.append(k.reshape(k.shape[0], k.shape[1], -1).float().cpu())
    return torch.stack(out, 1)


def config() -> FusionConfig:
    """The fusion config of this process (``KVSQUEEZE_FUSION``), or the defaults."""
    raw = os.environ.get(CONFIG_ENV)
    return FusionConfig.from_json(raw, CONFIG_ENV) if raw else FusionConfig()


class FusedBlockTables:
    """Remapped block tables of live requests over an engine pool of ``num_blocks`` blocks."""

    def __init__(self, num_blocks: int, threshold: float, similarity: str = DEFAULT_SIMILARITY):
        self.fusion = OnlinePageFusion(num_blocks, threshold, similarity)
        self.remap: dict[object, dict[int, int]] = {}  # request -> {block index: representative}
        self.owners: dict[int, object] = {}            # representative -> the request that wrote it

    @classmethod
    def from_config(cls, num_blocks: int, cfg: FusionConfig) -> "FusedBlockTables":
        tables = cls(num_blocks, cfg.threshold, cfg.similarity)
        tables.fusion = OnlinePageFusion.from_config(num_blocks, cfg)
        return tables

    def fuse_request(self, request, block_ids: list[int], n_full: int, keys) -> int:
        """Decide for the first ``n_full`` blocks of ``request`` (its prompt's full blocks);
        ``keys(block_ids)`` as for :meth:`OnlinePageFusion.fuse`. Returns how many blocks fused."""
        if not 0 <= n_full <= len(block_ids):
            raise bad_value("n_full", n_full, f"a number of full blocks in 0..{len(block_ids)}")
        index_of = self.fusion.index_of
        pages, indices = [], []
        for i, b in enumerate(block_ids[:n_full]):
            if int(index_of[b]) < 0 and b not in self.owners:  # not the engine's own shared prefix
                pages.append(int(b))
                indices.append(i)
        out = self.fusion.fuse(pages, indices, keys) if pages else {}
        table = self.remap.setdefault(request, {})
        for page, index in zip(pages, indices):
            if page in out:
                table[index] = out[page]
            else:
                self.owners[page] = request
        return len(out)

    def table(self, request, block_ids: list[int]) -> list[int]:
        """The table attention reads: the request's own blocks with fused ones remapped."""
        m = self.remap.get(request)
        return [m.get(i, b) for i, b in enumerate(block_ids)] if m else list(block_ids)

    def finish(self, request) -> list[int]:
        """The request ends (the engine frees its own blocks): its remaps give their references back,
        and tables that read its blocks read their own copies again. Returns the representatives it
        owned."""
        owned = [b for b, r in self.owners.items() if r == request]
        gone = set(owned)
        for other, m in self.remap.items():
            if other == request:
                continue
            for i in [i for i, rep in m.items() if rep in gone]:
                self.fusion.refs.unshare(m.pop(i))
        for rep in self.remap.pop(request, {}).values():
            self.fusion.refs.unshare(rep)
        for b in owned:
            del self.owners[b]
        if owned:
            self.fusion.release(torch.tensor(owned))  # no holders left: forgotten as representatives
        return owned

    def stats(self) -> dict:
        return {**self.fusion.stats(), "tables_remapped": sum(1 for m in self.remap.values() if m)}


# ---------------------------------------------------------------------------------------------
# TensorRT-LLM classes (built on first access)


def _build():  # pragma: no cover - needs TensorRT-LLM
    from kvsqueeze.backends.trtllm import require

    require("block fusion on TensorRT-LLM")
    from tensorrt_llm._torch.pyexecutor.resource_manager import KVCacheManager

    class FusedBlockKVCacheManager(KVCacheManager):
        def _fused(self) -> FusedBlockTables:
            if getattr(self, "_kvsqueeze_fused", None) is None:
                n_blocks = int(self.get_buffers(0).shape[0])
                cfg = config()
                self._kvsqueeze_fused = FusedBlockTables.from_config(n_blocks, cfg)
                self._kvsqueeze_layers = cfg.layers
            return self._kvsqueeze_fused

        def _own_blocks(self, request_id) -> list[int]:
            return list(super().get_batch_cache_indices([request_id])[0])

        def get_batch_cache_indices(self, request_ids, *args, **kwargs):
            tables = super().get_batch_cache_indices(request_ids, *args, **kwargs)
            fused = self._fused()
            return [fused.table(r, list(t)) for r, t in zip(request_ids, tables)]

        def update_resources(self, scheduled_batch, *args, **kwargs):
            out = super().update_resources(scheduled_batch, *args, **kwargs)
            fused = self._fused()
            n_layers = len(self.pp_layers) if hasattr(self, "pp_layers") else self.num_layers
            buffers = [self.get_buffers(layer) for layer in range(n_layers)]
            layers = parse_layers(self._kvsqueeze_layers, n_layers)
            for req in scheduled_batch.context_requests:
                if not getattr(req, "is_last_context_chunk", True):
                    continue
                blocks = self._own_blocks(req.py_request_id)
                n_full = min(len(blocks), req.prompt_len // self.tokens_per_block)
                fused.fuse_request(req.py_request_id, blocks, n_full,
                                   lambda ids: block_keys(buffers, ids, layers))
            return out

        def free_resources(self, request, *args, **kwargs):
            self._fused().finish(request.py_request_id)
            return super().free_resources(request, *args, **kwargs)

    return {"FusedBlockKVCacheManager": FusedBlockKVCacheManager}


_BUILT: dict | None = None


def __getattr__(name):  # pragma: no cover - needs TensorRT-LLM
    global _BUILT
    if name == "FusedBlockKVCacheManager":
        if _BUILT is None:
            _BUILT = _build()
        return _BUILT[name]
    raise AttributeError(name)


def install() -> None:  # pragma: no cover - needs TensorRT-LLM
    """Make TensorRT-LLM's executor (in this process) build :class:`FusedBlockKVCacheManager`."""
    cls = __getattr__("FusedBlockKVCacheManager")
    from tensorrt_llm._torch.pyexecutor import _util

    if not hasattr(_util, "KVCacheManager"):
        from kvsqueeze.errors import KvsqueezeError

        raise KvsqueezeError("block fusion on TensorRT-LLM: tensorrt_llm._torch.pyexecutor._util has no "
                             "KVCacheManager name to replace in this version; see docs/trtllm.md")
    _util.KVCacheManager = cls
