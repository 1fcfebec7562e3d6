"""KVTC behind TensorRT-LLM's KV cache connector: offload full blocks compressed, onboard them on a hit.

Engine-agnostic part (tested on CPU):

- :class:`BlockLayout`: one pool block as TensorRT-LLM lays it out, ``[layers, 2 (K, V),
  tokens_per_block, kv_heads, head_dim]`` (the per-layer view ``KVCacheManager.get_buffers`` gives is
  ``[blocks, 2, tokens, heads, dim]``; the connector's registered tensor indexes blocks first), split
  into and joined from kvsqueeze's per-layer ``[heads, tokens, dim]`` K and V;
- :func:`block_hashes`: a chained hash per *full* block (block i's key covers every token up to the end
  of block i, so two requests share a stored block only when their whole prefix agrees; hashing a
  block's own tokens alone, as TensorRT-LLM's connector example does, would restore KV computed under
  another prefix);
- :class:`KVTCBlockCache`: which blocks of a request are stored (consecutive from the first block not
  already on the device), save a block, load a block into a block tensor; pages go to a
  :class:`~kvsqueeze.methods.kvtc.store.KVTCStore` (host memory or a directory shared by processes).

TensorRT-LLM part: ``KVTCConnectorLeader`` (a ``KvCacheConnectorScheduler``) and ``KVTCConnectorWorker``
(a ``KvCacheConnectorWorker``), created on first access when ``tensorrt_llm`` imports. Configure with
``KvCacheConnectorConfig(connector_module="kvsqueeze.backends.trtllm.kvtc_connector",
connector_scheduler_class="KVTCConnectorLeader", connector_worker_class="KVTCConnectorWorker")`` and
the environment: ``KVSQUEEZE_KVTC_CALIBRATION`` (file), ``KVSQUEEZE_KVTC_DIR`` (directory; needed
when leader and workers are separate processes), ``KVSQUEEZE_KVTC_RATIO`` (default 8).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field

import torch

from kvsqueeze.errors import bad_value
from kvsqueeze.methods.kvtc import codec
from kvsqueeze.methods.kvtc.store import KVTCStore


@dataclass(frozen=True)
class BlockLayout:
    n_layers: int
    kv_heads: int
    tokens_per_block: int
    head_dim: int

    @property
    def numel(self) -> int:
        return self.n_layers * 2 * self.tokens_per_block * self.kv_heads * self.head_dim

    def _shaped(self, block: torch.Tensor) -> torch.Tensor:
        if block.numel() != self.numel:
            raise bad_value("block", tuple(block.shape),
                            f"{self.numel} elements: [layers={self.n_layers}, 2, tokens="
                            f"{self.tokens_per_block}, kv_heads={self.kv_heads}, head_dim="
                            f"{self.head_dim}] in any contiguous shape")
        return block.reshape(self.n_layers, 2, self.tokens_per_block, self.kv_heads, self.head_dim)

    def split(self, block: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer ``[kv_heads, tokens, head_dim]`` keys and values (float32, on the CPU)."""
        b = self._shaped(block).detach().to("cpu", torch.float32)
        keys = [b[layer, 0].permute(1, 0, 2).contiguous() for layer in range(self.n_layers)]
        values = [b[layer, 1].permute(1, 0, 2).contiguous() for layer in range(self.n_layers)]
        return keys, values

    def join_into(self, out: torch.Tensor, keys: list[torch.Tensor],
                  values: list[torch.Tensor]) -> None:
        """Write per-layer K and V into the block tensor ``out`` (its shape, dtype and device)."""
        view = self._shaped(out)
        stacked = torch.stack([torch.stack([k.permute(1, 0, 2), v.permute(1, 0, 2)])
                               for k, v in zip(keys, values)])
        view.copy_(stacked.to(out.dtype))


def block_hashes(tokens: list[int], tokens_per_block: int, salt: str = "") -> list[str]:
    """Chained hashes of the full blocks of ``tokens`` (a partial last block has none)."""
    if tokens_per_block < 1:
        raise bad_value("tokens_per_block", tokens_per_block, "a block size >= 1")
    h = hashlib.sha256(b"kvsqueeze-trtllm-kvtc|" + salt.encode())
    out = []
    for b in range(len(tokens) // tokens_per_block):
        chunk = tokens[b * tokens_per_block:(b + 1) * tokens_per_block]
        h.update(struct.pack(f"<{len(chunk)}q", *chunk))
        out.append(h.copy().hexdigest()[:40])
    return out


@dataclass
class KVTCBlockCache:
    """Stored-block lookups, saves and loads for one model's pool layout."""

    store: object  # KVTCStore
    layout: BlockLayout
    salt: str = ""
    saved: int = 0
    loaded: int = 0
    failed_loads: list[str] = field(default_factory=list)

    def _known(self, key: str) -> bool:
        return self.store.adopt(key)  # in this store, or written by another process: now indexed

    def matched_blocks(self, tokens: list[int], num_computed_tokens: int) -> list[tuple[str, int]]:
        """``(key, block index)`` of the stored blocks that follow the device's own prefix hit,
        consecutive from block ``num_computed_tokens / tokens_per_block``; none when that is not
        block-aligned (the device holds part of a block)."""
        tpb = self.layout.tokens_per_block
        if num_computed_tokens % tpb:
            return []
        hashes = block_hashes(tokens, tpb, self.salt)
        out = []
        for b in range(num_computed_tokens // tpb, len(hashes)):
            if not self._known(hashes[b]):
                break
            out.append((hashes[b], b))
        return out

    def blocks_to_save(self, tokens: list[int], first_block: int) -> list[tuple[str, int]]:
        """Full blocks from ``first_block`` on that the store does not hold yet."""
        hashes = block_hashes(tokens, self.layout.tokens_per_block, self.salt)
        return [(h, b) for b, h in enumerate(hashes) if b >= first_block and not self._known(h)]

    def save(self, key: str, block: torch.Tensor, block_index: int) -> bool:
        keys, values = self.layout.split(block)
        ok = self.store.put(key, keys, values, block_index * self.layout.tokens_per_block)
        self.saved += int(ok)
        return ok

    def load(self, key: str, out: torch.Tensor, block_index: int) -> bool:
        """Decode a stored block into ``out``; False (and ``out`` untouched) when it cannot be."""
        got = self.store.get(key)
        if got is None or got[2] != block_index * self.layout.tokens_per_block:
            self.failed_loads.append(key)
            return False
        keys, values, _ = got
        self.layout.join_into(out, keys, values)
        self.loaded += 1
        return True


def _cache_from_env(tokens_per_block: int) -> KVTCBlockCache:
    """The block cache the connector classes use, configured by the environment (module docstring)."""
    cal_path = os.environ.get("KVSQUEEZE_KVTC_CALIBRATION")
    if not cal_path:
        raise bad_value("KVSQUEEZE_KVTC_CALIBRATION", cal_path,
                        "the path of a calibration made by `kvsqueeze kvtc calibrate` for this model")
    cal = codec.Calibration.load(cal_path)
    ratio = float(os.environ.get("KVSQUEEZE_KVTC_RATIO", "8"))
    store = KVTCStore(cal, ratio, os.environ.get("KVSQUEEZE_KVTC_DIR") or None)
    return KVTCBlockCache(store, BlockLayout(cal.n_layers, cal.kv_heads, tokens_per_block,
                                             cal.head_dim))


def _make_classes():  # pragma: no cover - needs tensorrt_llm (checked by scripts/check_trtllm_gpu.sh)
    from kvsqueeze.backends.trtllm import require

    require("the KVTC connector for TensorRT-LLM")
    from tensorrt_llm._torch.pyexecutor.kv_cache_connector import (KvCacheConnectorScheduler,
                                                                   KvCacheConnectorWorker)

    class KVTCConnectorLeader(KvCacheConnectorScheduler):
        """Decides which blocks to onboard (stored, after the device hit) and which to offload."""

        def __init__(self, llm_args):
            super().__init__(llm_args)
            self.cache = _cache_from_env(llm_args.kv_cache_config.tokens_per_block)
            self.pending: dict[int, list[tuple[str, int]]] = {}
            self.tokens: dict[int, list[int]] = {}

        def get_num_new_matched_tokens(self, request, num_computed_tokens):
            tokens = list(request.get_tokens(0))
            hits = self.cache.matched_blocks(tokens, num_computed_tokens)
            self.pending[request.request_id] = hits
            self.tokens[request.request_id] = tokens
            return len(hits) * self.cache.layout.tokens_per_block, False

        def update_state_after_alloc(self, request, block_ids):
            pass

        def build_connector_meta(self, scheduler_output):
            load, save = [], []
            for req in scheduler_output.new_requests:
                hits = self.pending.pop(req.request_id, [])
                ids = list(req.new_block_ids)
                for key, b in hits:
                    if b < len(ids):
                        load.append((key, ids[b], b))
                tokens = self.tokens.pop(req.request_id, list(req.new_tokens))
                first = (hits[-1][1] + 1) if hits else req.computed_position // \
                    self.cache.layout.tokens_per_block
                for key, b in self.cache.blocks_to_save(tokens, first):
                    if b < len(ids):
                        save.append((key, ids[b], b))
            return {"load": load, "save": save}

        def request_finished(self, request, cache_block_ids):
            return False  # saves are synchronous (wait_for_save)

    class KVTCConnectorWorker(KvCacheConnectorWorker):
        """Encodes offloaded blocks after the forward pass; decodes onboarded blocks before it."""

        def __init__(self, llm_args):
            super().__init__(llm_args)
            self.cache = _cache_from_env(llm_args.kv_cache_config.tokens_per_block)
            self.layout = self.cache.layout
            self.kv = None

        def register_kv_caches(self, kv_cache_tensor):
            self.kv = kv_cache_tensor
            if kv_cache_tensor[0].numel() != self.layout.numel:
                raise bad_value("kv_cache_tensor", tuple(kv_cache_tensor.shape),
                                f"blocks of {self.layout.numel} elements ({self.layout})")

        def start_load_kv(self, stream):
            for key, block_id, b in (self._metadata or {}).get("load", []):
                self.cache.load(key, self.kv[block_id], b)

        def wait_for_layer_load(self, layer_idx, stream):
            pass

        def save_kv_layer(self, layer_idx, stream):
            pass

        def wait_for_save(self, stream):
            save = (self._metadata or {}).get("save", [])
            if save:
                stream.synchronize()
            for key, block_id, b in save:
                self.cache.save(key, self.kv[block_id], b)

        def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
            return [], []

    return {"KVTCConnectorLeader": KVTCConnectorLeader, "KVTCConnectorWorker": KVTCConnectorWorker}


def __getattr__(name):
    if name in ("KVTCConnectorLeader", "KVTCConnectorWorker"):
        classes = _make_classes()
        globals().update(classes)
        return classes[name]
    raise AttributeError(name)
