"""A KVTC-compressed page store: the engine-agnostic core of the KVTC storage tier.

Pages (one or more consecutive tokens of every layer's K and V, with their absolute position) are
encoded into KVTC blobs and kept in host memory or in a directory, one file per page. The engine
adapter (SGLang's HiCache storage interface) only maps its page buffers to :meth:`KVTCStore.put`
and :meth:`KVTCStore.get`.

The first ``sinks`` tokens of a sequence (attention sinks) stay exact inside their page record:
compressing them is what breaks a restored cache (measured: at 4x, KL 18x larger and greedy output
changed on a held-out prompt; with them exact, the same output as the dense cache). A record is
``MAGIC | version | n_exact | exact K/V bytes | KVTC blob | crc32``.

Guarantees: a page is either stored whole or not at all (files are written under a temporary name
and renamed; the in-memory map is updated under a lock); a page that fails to decode (truncated or
corrupted file, another calibration) is reported as a miss, counted, and removed, never returned.
``capacity_bytes`` bounds the stored bytes, evicting the least recently used pages.

``workers=N`` (with ``calibration_path``) runs the codec in N worker processes: :meth:`KVTCStore.get_many`
and :meth:`KVTCStore.put_many` decode and encode a batch of pages in parallel, and the caller's
process only ships page bytes. Inside a serving engine this matters more than the parallelism: the
codec makes thousands of short calls per page, and in a thread of the engine's process each of them
waits for the interpreter lock the engine's scheduler loop keeps taking (measured in SGLang's CPU
server: 94 ms per 64-token page in its storage thread against 32 ms alone). A worker that dies is
replaced by in-process coding; nothing is lost.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import multiprocessing
import os
import struct
import threading
import zlib
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvsqueeze.errors import bad_value
from kvsqueeze.methods.kvtc import codec

logger = logging.getLogger(__name__)

RECORD_MAGIC = b"KVPG"
RECORD_VERSION = 1


def pack_page(cal: codec.Calibration, keys: list[torch.Tensor], values: list[torch.Tensor], position: int,
              ratio: float, sinks: int = 4) -> bytes:
    """One page record: its first tokens below position ``sinks`` exact, the rest a KVTC blob."""
    n = keys[0].shape[1]
    exact = min(max(0, sinks - position), n)
    raw = b"".join(t[:, :exact].contiguous().numpy().tobytes() for t in keys + values) if exact else b""
    blob = codec.encode(cal, [k[:, exact:] for k in keys], [v[:, exact:] for v in values],
                        position + exact, ratio).data if exact < n else b""
    body = RECORD_MAGIC + struct.pack("<HIII", RECORD_VERSION, exact, len(raw), n) + raw + blob
    return body + struct.pack("<I", zlib.crc32(body))


def record_fields(data: bytes) -> tuple[int, int, int, int]:
    """``(version, exact tokens, exact bytes, tokens)`` from a record's framing (no checksum check)."""
    if len(data) < 22 or data[:4] != RECORD_MAGIC:
        raise codec.BlobError("page record: truncated or not a kvsqueeze page record")
    return struct.unpack_from("<HIII", data, 4)


def unpack_page(cal: codec.Calibration, data: bytes):
    """Inverse of :func:`pack_page`: ``(keys, values, position)``; raises :class:`codec.BlobError`."""
    version, exact, raw_len, n = record_fields(data)
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(data[:-4]) != crc:
        raise codec.BlobError("page record: checksum mismatch (truncated or corrupted)")
    if version != RECORD_VERSION:
        raise codec.BlobError(f"page record: version {version}; this kvsqueeze reads {RECORD_VERSION}")
    raw, blob = data[18:18 + raw_len], data[18 + raw_len:-4]
    if not blob:
        raise codec.BlobError("page record: no compressed part (pages must be longer than the sinks)")
    header = codec.read_header(blob)
    keys, values = codec.decode(cal, blob)
    position = header["position"] - exact
    if exact:
        dt = keys[0].dtype
        per = cal.kv_heads * exact * cal.head_dim
        if len(raw) != 2 * cal.n_layers * per * dt.itemsize:
            raise codec.BlobError("page record: exact part has the wrong size")
        flat = torch.frombuffer(bytearray(raw), dtype=dt)
        parts = flat.split(per)
        ex = [p.reshape(cal.kv_heads, exact, cal.head_dim) for p in parts]
        keys = [torch.cat([e, k], 1) for e, k in zip(ex[:cal.n_layers], keys)]
        values = [torch.cat([e, v], 1) for e, v in zip(ex[cal.n_layers:], values)]
    if keys[0].shape[1] != n:
        raise codec.BlobError(f"page record: {keys[0].shape[1]} tokens, header says {n}")
    return keys, values, position


# -- worker processes ----------------------------------------------------------------------------

_WORKER_CAL: codec.Calibration | None = None


def warm_plans(ratio: float, steps: int = 8) -> list[float]:
    """The allocation plans rate control visits most for a target ``ratio`` (the target's own plan
    and the next grid points above it)."""
    return sorted({codec._grid_ratio(ratio * 1.01 ** k) for k in range(steps + 1)})


def _worker_init(calibration_path: str, allocation_dir: str | None, plans: list[float], ready=None) -> None:
    global _WORKER_CAL
    import random

    torch.set_num_threads(1)
    _WORKER_CAL = codec.Calibration.load(calibration_path)
    if allocation_dir is not None:
        _WORKER_CAL.use_allocation_cache(allocation_dir)
    # plan now, not on a first page; in a random order, so that workers starting together mostly
    # solve different plans and load each other's from the allocation cache
    random.Random(os.getpid()).shuffle(plans)
    for plan in plans:
        _WORKER_CAL.allocation(plan)
    if ready is not None:  # one more worker warm (KVTCStore.wait_ready counts them)
        with ready.get_lock():
            ready.value += 1


def _worker_ready() -> bool:
    return _WORKER_CAL is not None


def _to_wire(tensors: list[torch.Tensor]) -> tuple[bytes, tuple, str]:
    """Per-layer tensors as one byte string (any dtype, bfloat16 included), its shape and dtype."""
    x = torch.stack([t.contiguous() for t in tensors])
    return x.view(torch.uint8).numpy().tobytes(), tuple(x.shape), codec._dtype_name(x.dtype)


def _from_wire(wire: tuple[bytes, tuple, str]) -> list[torch.Tensor]:
    data, shape, dtype = wire
    x = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(codec._DTYPES[dtype]).reshape(shape)
    return list(x.unbind(0))


def _worker_unpack(data: bytes):
    k, v, position = unpack_page(_WORKER_CAL, data)
    return _to_wire(k), _to_wire(v), position


def _worker_pack(keys_wire, values_wire, position: int, ratio: float, sinks: int) -> bytes:
    return pack_page(_WORKER_CAL, _from_wire(keys_wire), _from_wire(values_wire), position, ratio, sinks)


@dataclass
class StoreStats:
    pages_stored: int = 0        # puts that stored a new page
    pages_held: int = 0          # pages in the store now
    bytes_before: int = 0        # 16-bit K+V bytes of the pages held
    bytes_after: int = 0         # blob bytes of the pages held
    hits: int = 0
    misses: int = 0
    corrupt: int = 0             # pages that failed to decode (dropped)
    write_errors: int = 0        # pages not stored because the directory refused the write (full, read-only)
    evicted: int = 0
    encode_seconds: float = 0.0   # wall time spent storing pages (a parallel batch counts once)
    restore_seconds: float = 0.0  # wall time spent decoding hits (a parallel batch counts once)

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


class KVTCStore:
    """Pages keyed by string, KVTC-compressed at ``ratio``, in memory (``directory=None``) or on disk."""

    def __init__(self, calibration: codec.Calibration, ratio: float, directory: str | Path | None = None,
                 capacity_bytes: int | None = None, sinks: int = 4, workers: int = 0,
                 calibration_path: str | Path | None = None, allocation_dir: str | Path | None = None):
        if not ratio >= 1:
            raise bad_value("ratio", ratio, "a number >= 1 (the target compression ratio)")
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise bad_value("capacity_bytes", capacity_bytes, "a positive number of bytes")
        if sinks < 0:
            raise bad_value("sinks", sinks, "a number of tokens >= 0")
        if not (isinstance(workers, int) and workers >= 0):
            raise bad_value("workers", workers, "a number of codec processes >= 0 (0: code in this process)")
        if workers and calibration_path is None:
            raise bad_value("calibration_path", None, "the calibration's file, which worker processes load")
        self.cal, self.ratio, self.capacity, self.sinks = calibration, float(ratio), capacity_bytes, sinks
        self.dir = Path(directory) if directory is not None else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index: OrderedDict[str, tuple[int, int, bytes | None]] = OrderedDict()  # key -> (before, after, blob)
        self.stats = StoreStats()
        if self.dir is not None:
            self._scan()
        if allocation_dir is not None:
            calibration.use_allocation_cache(allocation_dir)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        if workers:
            ctx = multiprocessing.get_context("spawn")
            self._ready = ctx.Value("i", 0)  # workers done warming
            self._pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_worker_init,
                initargs=(str(calibration_path), None if allocation_dir is None else str(allocation_dir),
                          warm_plans(self.ratio), self._ready))
            self._warming = [self._pool.submit(_worker_ready) for _ in range(workers)]  # start them now

    @property
    def workers(self) -> int:
        return self._pool._max_workers if self._pool is not None else 0

    def wait_ready(self, timeout: float | None = None) -> float:
        """Block until every worker process has started and planned its allocations (what would
        otherwise delay the first pages a server stores or restores), or, without workers, plan them
        in this process; returns the seconds taken. A worker that fails to start sends the store to
        in-process coding, as any dead worker does."""
        t0 = time.perf_counter()
        if self._pool is None:
            for plan in warm_plans(self.ratio):
                self.cal.allocation(plan)
        while self._pool is not None and self._ready.value < self.workers:
            failed = next((f.exception() for f in self._warming if f.done() and f.exception()), None)
            if failed is not None:
                self._pool_failed(failed)
                break
            if timeout is not None and time.perf_counter() - t0 > timeout:
                logger.warning("kvtc store: codec workers not ready after %.0f s; the first pages may wait",
                               timeout)
                break
            time.sleep(0.1)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop the worker processes (the store keeps working in this process)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _pool_failed(self, exc: BaseException) -> None:
        logger.warning("kvtc store: codec worker processes failed (%s); coding in this process from now on",
                       exc)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- layout -------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.dir / (hashlib.sha256(key.encode()).hexdigest()[:40] + ".kvtc")

    def _scan(self) -> None:
        """Adopt pages already in the directory (a restart keeps the store); their key is unknown
        until asked, so they are indexed by file name and looked up through :meth:`_path`."""
        for p in sorted(self.dir.glob("*.kvtc")):
            if not self._index_file(p):
                self.stats.corrupt += 1
                p.unlink(missing_ok=True)

    def _index_file(self, path: Path) -> bool:
        """Index one page file (by file name) and count it; False if it is not a readable record."""
        try:
            data = path.read_bytes()
            n = record_fields(data)[3]
        except (OSError, codec.BlobError):
            return False
        before = 2 * self.cal.n_layers * n * self.cal.kv_heads * self.cal.head_dim * 2
        with self._lock:
            if ("file:" + path.name) in self._index:
                return True
            self._index["file:" + path.name] = (before, len(data), None)
            self.stats.pages_held += 1
            self.stats.bytes_before += before
            self.stats.bytes_after += len(data)
        return True

    def _slot(self, key: str) -> str | None:
        if key in self._index:
            return key
        if self.dir is not None and "file:" + self._path(key).name in self._index:
            return "file:" + self._path(key).name
        return None

    # -- API ------------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        with self._lock:
            return self._slot(key) is not None

    def on_disk(self, key: str) -> bool:
        """Whether the page's file is in the directory now (written by this or another process)."""
        return self.dir is not None and self._path(key).is_file()

    def adopt(self, key: str) -> bool:
        """Index a page file another process wrote; True if it is (now) in this store."""
        if self.exists(key):
            return True
        return self.on_disk(key) and self._index_file(self._path(key))

    def put(self, key: str, keys: list[torch.Tensor], values: list[torch.Tensor], position: int) -> bool:
        """Compress and store one page (``[kv_heads, n, head_dim]`` per layer, keys with RoPE). False
        when the directory refused the write (the page is then simply not stored)."""
        if self.exists(key):
            return True
        t0 = time.perf_counter()
        record = pack_page(self.cal, keys, values, position, self.ratio, self.sinks)
        return self._record(key, record, 2 * len(keys) * keys[0].numel() * 2, time.perf_counter() - t0)

    def put_many(self, pages: list[tuple[str, list[torch.Tensor], list[torch.Tensor], int]]) -> list[bool]:
        """:meth:`put` for ``(key, keys, values, position)`` pages, encoded in parallel by the workers."""
        pool = self._pool
        if pool is None:
            return [self.put(*page) for page in pages]
        t0 = time.perf_counter()
        todo = [i for i, page in enumerate(pages) if not self.exists(page[0])]
        try:
            futures = {i: pool.submit(_worker_pack, _to_wire(pages[i][1]), _to_wire(pages[i][2]),
                                            pages[i][3], self.ratio, self.sinks) for i in todo}
            records = {i: f.result() for i, f in futures.items()}
        except (concurrent.futures.process.BrokenProcessPool, RuntimeError) as exc:  # dead or shut down
            self._pool_failed(exc)
            return [self.put(*page) for page in pages]
        dt = time.perf_counter() - t0
        out = [True] * len(pages)
        for n, i in enumerate(todo):
            key, keys = pages[i][0], pages[i][1]
            out[i] = self._record(key, records[i], 2 * len(keys) * keys[0].numel() * 2, dt if n == 0 else 0.0)
        return out

    def _tmp_path(self, path: Path) -> Path:
        return path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")

    def _record(self, key: str, record: bytes, before: int, seconds: float) -> bool:
        if self.dir is not None:
            path = self._path(key)
            tmp = self._tmp_path(path)
            try:
                tmp.write_bytes(record)
                os.replace(tmp, path)
            except OSError as exc:  # full or read-only: the page is not stored, nothing half-written stays
                tmp.unlink(missing_ok=True)
                with self._lock:
                    self.stats.write_errors += 1
                    first = self.stats.write_errors == 1
                (logger.warning if first else logger.debug)(
                    "kvtc store: page not stored in %s (%s); the engine recomputes it when needed",
                    self.dir, exc.strerror or exc)
                return False
        with self._lock:
            if self._slot(key) is not None:  # another thread stored it meanwhile
                return True
            self._index[key] = (before, len(record), None if self.dir is not None else record)
            self.stats.pages_stored += 1
            self.stats.pages_held += 1
            self.stats.bytes_before += before
            self.stats.bytes_after += len(record)
            self.stats.encode_seconds += seconds
            self._evict_locked()
        return True

    def _lookup(self, key: str) -> tuple[str | None, bytes | None]:
        """``(slot, record)`` of a stored page (the record read from disk if need be); counts misses."""
        with self._lock:
            slot = self._slot(key)
            if slot is None:
                self.stats.misses += 1
                return None, None
            self._index.move_to_end(slot)
            data = self._index[slot][2]
        if data is None:
            try:
                data = self._path(key).read_bytes()
            except OSError:
                self._undecodable(slot, key)
                return None, None
        return slot, data

    def _undecodable(self, slot: str, key: str) -> None:
        with self._lock:
            self.stats.corrupt += 1
            self.stats.misses += 1
            self._drop_locked(slot, key)

    def get(self, key: str) -> tuple[list[torch.Tensor], list[torch.Tensor], int] | None:
        """Decode one page: ``(keys, values, position)``, or None (missing or undecodable)."""
        t0 = time.perf_counter()
        slot, data = self._lookup(key)
        if slot is None:
            return None
        got = self._unpack(data)
        if isinstance(got, codec.BlobError):
            self._undecodable(slot, key)
            return None
        k, v, position = got
        with self._lock:
            self.stats.hits += 1
            self.stats.restore_seconds += time.perf_counter() - t0
        return k, v, position

    def _unpack(self, data: bytes):
        """``(keys, values, position)`` of a record, or the :class:`codec.BlobError` it raised."""
        try:
            return unpack_page(self.cal, data)
        except codec.BlobError as exc:
            return exc

    def get_many(self, keys: list[str]) -> list[tuple[list[torch.Tensor], list[torch.Tensor], int] | None]:
        """:meth:`get` for several pages, decoded in parallel by the workers."""
        pool = self._pool
        if pool is None:
            return [self.get(key) for key in keys]
        t0 = time.perf_counter()
        found = [self._lookup(key) for key in keys]
        try:
            futures = [pool.submit(_worker_unpack, data) if slot is not None else None
                       for slot, data in found]
            done = []
            for f in futures:
                try:
                    got = f.result() if f is not None else None
                    done.append(got if got is None else (_from_wire(got[0]), _from_wire(got[1]), got[2]))
                except codec.BlobError as exc:
                    done.append(exc)
        except (concurrent.futures.process.BrokenProcessPool, RuntimeError) as exc:  # dead or shut down
            self._pool_failed(exc)
            done = [self._unpack(data) if slot is not None else None for slot, data in found]
        out, hits = [], 0
        for key, (slot, _), got in zip(keys, found, done):
            if isinstance(got, codec.BlobError):
                self._undecodable(slot, key)
                got = None
            if got is None:
                out.append(None)
                continue
            hits += 1
            out.append(got)
        with self._lock:
            self.stats.hits += hits
            self.stats.restore_seconds += time.perf_counter() - t0
        return out

    def clear(self) -> None:
        with self._lock:
            for slot in list(self._index):
                self._drop_locked(slot, None)

    def snapshot(self) -> dict:
        with self._lock:
            return self.stats.to_dict()

    # -- internals ------------------------------------------------------------------------------

    def _drop_locked(self, slot: str, key: str | None) -> None:
        entry = self._index.pop(slot, None)
        if entry is None:
            return
        before, after, _ = entry
        self.stats.pages_held -= 1
        self.stats.bytes_before -= before
        self.stats.bytes_after -= after
        if self.dir is not None:
            name = slot[5:] if slot.startswith("file:") else self._path(slot).name
            (self.dir / name).unlink(missing_ok=True)

    def _evict_locked(self) -> None:
        while self.capacity is not None and self.stats.bytes_after > self.capacity and len(self._index) > 1:
            oldest = next(iter(self._index))
            self._drop_locked(oldest, None)
            self.stats.evicted += 1
