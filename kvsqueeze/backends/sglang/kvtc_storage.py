"""SGLang HiCache storage backend that keeps radix-cache pages KVTC-compressed.

Loaded by SGLang's dynamic storage-backend option (``kvsqueeze serve --kv-store kvtc[:DIR]`` sets it):

    --enable-hierarchical-cache --hicache-io-backend direct --hicache-mem-layout layer_first
    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config '{
        "backend_name": "kvtc", "module_path": "kvsqueeze.backends.sglang.kvtc_storage",
        "class_name": "KVTCHiCacheStorage", "interface_v1": 1,
        "hicache_storage_pass_prefix_keys": true,
        "kvtc_calibration": FILE, "kvtc_ratio": 8, "kvtc_dir": DIR or null,
        "kvtc_workers": N (codec processes; default min(2, cores); 0 codes on SGLang's thread)}'

``interface_v1`` makes SGLang hand over host-pool indices (zero copy): a page is read from the host
pool, encoded with :class:`kvsqueeze.methods.kvtc.store.KVTCStore` and restored into the host pool on
a prefix hit. ``hicache_storage_pass_prefix_keys`` gives each page its absolute position (the
number of pages before it), which the codec needs to take RoPE off the keys; without positions a
page is not stored (SGLang recomputes it), never stored wrongly. The engine-agnostic work (codec,
store) is tested on its own; this class only maps host-pool pages.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, List, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from kvsqueeze.backends.sglang.metrics import gauges
from kvsqueeze.methods.kvtc import codec
from kvsqueeze.methods.kvtc.store import KVTCStore
from kvsqueeze.model import home

logger = logging.getLogger(__name__)

STATS_ENV = "KVSQUEEZE_KVTC_STATS"  # file where the scheduler publishes the store's stats (JSON)
METRICS = {  # store stat -> (Prometheus gauge name, help)
    "pages_stored": ("kvsqueeze_kvtc_pages_stored", "KVTC pages stored since start"),
    "pages_held": ("kvsqueeze_kvtc_pages_held", "KVTC pages in the store now"),
    "bytes_before": ("kvsqueeze_kvtc_bytes_before", "16-bit K+V bytes of the pages held"),
    "bytes_after": ("kvsqueeze_kvtc_bytes_after", "compressed bytes of the pages held"),
    "hits": ("kvsqueeze_kvtc_hits", "pages restored from the store"),
    "misses": ("kvsqueeze_kvtc_misses", "pages asked for and not found (or undecodable)"),
    "corrupt": ("kvsqueeze_kvtc_corrupt", "pages dropped because they failed to decode"),
    "write_errors": ("kvsqueeze_kvtc_write_errors", "pages not stored: the store directory refused the write"),
    "encode_seconds": ("kvsqueeze_kvtc_encode_seconds", "total time spent compressing pages"),
    "restore_seconds": ("kvsqueeze_kvtc_restore_seconds", "total time spent decompressing hits"),
}


class KVTCHiCacheStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Any = None):
        extra = dict(storage_config.extra_config or {})
        path = extra.get("kvtc_calibration")
        if not path:
            raise ValueError("kvtc storage: extra_config needs 'kvtc_calibration' (a calibration file)")
        self.cal = codec.Calibration.load(path)
        self.ratio = float(extra.get("kvtc_ratio", 8))
        directory = extra.get("kvtc_dir")
        if directory and storage_config.tp_size > 1:
            directory = os.path.join(directory, f"tp{storage_config.tp_rank}")
        workers = extra.get("kvtc_workers")
        if workers is None:
            workers = min(2, os.cpu_count() or 1)
        if not (isinstance(workers, int) and workers >= 0):
            raise ValueError(f"kvtc storage: extra_config kvtc_workers={workers!r}; expected a number of "
                             "codec processes >= 0 (0: code in the storage thread)")
        self.store = KVTCStore(self.cal, self.ratio, directory=directory,
                               capacity_bytes=extra.get("kvtc_capacity_bytes"), workers=workers,
                               calibration_path=path, allocation_dir=home() / "kvtc" / "allocations")
        self.stats_file = extra.get("kvtc_stats_file") or os.environ.get(STATS_ENV)
        self.mem_pool_host = None
        self._warned_no_position = False
        logger.info("kvsqueeze KVTC storage: ratio %.3g, %s, calibration %s, %d codec processes",
                    self.ratio, directory or "host memory", self.cal.fingerprint(), workers)
        # Warm before the server says it is ready: the codec processes start and plan their bit
        # allocations (seconds each, minutes in all on a fresh machine with no allocation cache), which
        # otherwise happens under the first requests and stalls them behind the storage thread.
        waited = self.store.wait_ready(timeout=float(extra.get("kvtc_warm_timeout", 900)))
        logger.info("kvsqueeze KVTC storage: codec warm after %.1f s", waited)

    # -- host pool pages ------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host):
        layout = getattr(mem_pool_host, "layout", None)
        if layout != "layer_first":
            raise ValueError(f"kvtc storage: host pool layout {layout!r}; expected 'layer_first' "
                             "(--hicache-mem-layout layer_first)")
        geom = (mem_pool_host.layer_num, mem_pool_host.head_num, mem_pool_host.head_dim)
        if geom != (self.cal.n_layers, self.cal.kv_heads, self.cal.head_dim):
            raise ValueError(f"kvtc storage: host pool (layers, kv heads, head dim) = {geom}, the "
                             f"calibration is for {(self.cal.n_layers, self.cal.kv_heads, self.cal.head_dim)}")
        super().register_mem_pool_host(mem_pool_host)

    def _page(self, rows: torch.Tensor):
        pool = self.mem_pool_host
        keys = [pool.k_buffer[l].index_select(0, rows).permute(1, 0, 2) for l in range(pool.layer_num)]
        values = [pool.v_buffer[l].index_select(0, rows).permute(1, 0, 2) for l in range(pool.layer_num)]
        return keys, values

    def _write_page(self, rows: torch.Tensor, keys, values) -> None:
        pool = self.mem_pool_host
        for l in range(pool.layer_num):
            pool.k_buffer[l].index_copy_(0, rows, keys[l].permute(1, 0, 2).to(pool.k_buffer.dtype))
            pool.v_buffer[l].index_copy_(0, rows, values[l].permute(1, 0, 2).to(pool.v_buffer.dtype))

    def _positions(self, n_keys: int, extra_info) -> Optional[list[int]]:
        prefix = getattr(extra_info, "prefix_keys", None) if extra_info is not None else None
        if prefix is None:
            if not self._warned_no_position:
                logger.warning("kvtc storage: SGLang passed no prefix keys, so page positions are "
                               "unknown; pages are not stored (set hicache_storage_pass_prefix_keys)")
                self._warned_no_position = True
            return None
        ps = self.mem_pool_host.page_size
        return [(len(prefix) + i) * ps for i in range(n_keys)]

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info=None) -> List[bool]:
        ps = self.mem_pool_host.page_size
        positions = self._positions(len(keys), extra_info)
        if positions is None:
            return [False] * len(keys)
        try:
            pages = [(key, *self._page(host_indices[i * ps:(i + 1) * ps].long()), positions[i])
                     for i, key in enumerate(keys)]
            out = self.store.put_many(pages)
        except Exception:  # a page that cannot be stored is recomputed, never half-stored
            logger.exception("kvtc storage: storing pages %s..%s failed", keys[0], keys[-1])
            out = [self.store.exists(key) for key in keys]
        self._publish()
        return out

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info=None) -> List[bool]:
        ps = self.mem_pool_host.page_size
        out = []
        for i, (key, got) in enumerate(zip(keys, self.store.get_many(keys))):
            if got is None or got[0][0].shape[1] != ps:
                out.append(False)
                continue
            self._write_page(host_indices[i * ps:(i + 1) * ps].long(), got[0], got[1])
            out.append(True)
        self._publish()
        return out

    def batch_exists(self, keys: List[str], extra_info=None) -> int:
        for i, key in enumerate(keys):
            if not self.store.exists(key):
                return i
        return len(keys)

    def exists(self, key: str) -> bool:
        return self.store.exists(key)

    # the generic (copying) interface is not used with interface_v1; refuse it loudly
    def get(self, key, target_location=None, target_sizes=None):
        raise NotImplementedError("kvtc storage runs with interface_v1 (zero-copy host pages)")

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        raise NotImplementedError("kvtc storage runs with interface_v1 (zero-copy host pages)")

    def set(self, key, value=None, target_location=None, target_sizes=None):
        raise NotImplementedError("kvtc storage runs with interface_v1 (zero-copy host pages)")

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None):
        raise NotImplementedError("kvtc storage runs with interface_v1 (zero-copy host pages)")

    def clear(self) -> None:
        self.store.clear()
        self._publish()

    def get_stats(self):
        return None  # SGLang's storage metrics expect its own collector type; ours go to _publish

    def stats(self) -> dict:
        return self.store.snapshot()

    def _publish(self) -> None:
        """Export the store's stats: Prometheus gauges (``/metrics``) and, if set, a JSON file."""
        snap = self.store.snapshot()
        for key, gauge in gauges(METRICS).items():
            gauge.set(snap[key])
        if not self.stats_file:
            return
        tmp = f"{self.stats_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.store.snapshot(), f)
        os.replace(tmp, self.stats_file)
