"""Block fusion inside SGLang: near-duplicate full pages become shared, ref-counted pages.

Turned on by ``kvsqueeze serve --method fusion:T[:SIMILARITY]`` (which sets ``KVSQUEEZE_FUSION`` to a
:class:`~kvsqueeze.methods.fusion.config.FusionConfig` as JSON and requires ``--page-size`` > 1);
installed in the scheduler process by the kvsqueeze plugin. Nothing in SGLang is edited; these
methods are wrapped through :mod:`kvsqueeze.backends.sglang.patch`, each calling the one it replaces
(SGLang 0.5.23):

- ``PagedTokenToKVPoolAllocator._release_page_ids``: every free of the paged allocator ends here
  (``free``, ``free_segment``, ``free_page_ids``, grouped or not). A page with extra holders loses
  one instead of going back to the free list (:class:`kvsqueeze.methods.fusion.refs.PageRefs`).
- ``UnifiedRadixCache.checkpoint`` (the tree SGLang 0.5.23 builds by default; ``RadixCache``'s too):
  SGLang publishes a request's computed KV into the radix tree after its prefill and when it finishes
  (``checkpoint_kv_cache``, ``release_kv_cache``). Just before, the request's *own* new full pages
  (those past ``cache_protected_len``, i.e. not an exact radix prefix) are compared with the live
  representatives at the same page index (:class:`~kvsqueeze.methods.fusion.online.OnlinePageFusion`);
  a page that fuses has its ``req_to_token`` entries pointed at the representative's slots, the
  representative gains a holder, and the page is freed at once (the scheduler can hand it out in the
  same step). The tree then stores the request's tokens with the representative's slots, so exact
  prefixes stay shared as before and a near-duplicate's node points at the shared page. The last,
  partial page is never fused (decode writes into it), and representatives are full pages, never
  written again.
- ``evictable_size`` / ``protected_size`` of the same classes: a shared page is counted once per tree
  node that holds it; :func:`shared_overcount` takes the extra holders off (a shared page counts as
  evictable only if no locked node holds it), so admission and SGLang's idle leak check (available +
  evictable + protected == total) see the physical pages.
- ``evict_to_free_tokens``: evicting a node whose page is still shared frees nothing, so eviction goes
  on until the allocation fits or nothing is evictable.
- ``Scheduler.get_new_batch_prefill``: SGLang stops admitting after a prefill that did not fit until a
  request leaves (``batch_is_full``); pages freed by fusion reopen admission on the next step.

Metrics: ``meta_info["kvsqueeze_fusion"]`` of each finished request, a one-element list (SGLang's
customized-info channel accumulates lists): ``pages`` (its own new full pages, i.e. past its radix
prefix), ``fused_pages`` (of those, pages it reads from a shared page) and ``fused_fraction``; with
``--enable-metrics``, gauges ``kvsqueeze_fusion_*`` on ``/metrics`` (pages checked and fused since
start, pages saved and shared pages now, prefills checked).
"""

from __future__ import annotations

import logging
import os

import torch

from kvsqueeze.backends.sglang.metrics import gauges
from kvsqueeze.backends.sglang.patch import patch, set_value
from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.methods.fusion.config import FusionConfig, parse_layers
from kvsqueeze.methods.fusion.online import OnlinePageFusion

logger = logging.getLogger(__name__)

ENV = "KVSQUEEZE_FUSION"
META_KEY = "kvsqueeze_fusion"
METRICS = {  # stat -> (gauge, help)
    "pages_checked": ("kvsqueeze_fusion_pages_checked", "new full pages compared since start"),
    "pages_fused": ("kvsqueeze_fusion_pages_fused", "pages fused into a shared page since start"),
    "pages_saved": ("kvsqueeze_fusion_pages_saved", "pages freed by fusion and still shared now"),
    "groups": ("kvsqueeze_fusion_groups", "shared pages with more than one holder now"),
    "requests": ("kvsqueeze_fusion_requests", "prefills checked for fusion since start"),
}
_installed = False


def config_env(cfg: FusionConfig) -> dict[str, str]:
    """Environment for the server process: the fusion config as JSON."""
    return {ENV: cfg.to_json()}


def _config() -> FusionConfig | None:
    raw = os.environ.get(ENV)
    return FusionConfig.from_json(raw, ENV) if raw else None


# ---- state ------------------------------------------------------------------------------------


class _State:
    def __init__(self, alloc, cfg: FusionConfig):
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator

        if not isinstance(alloc, PagedTokenToKVPoolAllocator) or alloc.page_size < 2:
            raise KvsqueezeError(f"kvsqueeze fusion: needs SGLang's paged allocator with --page-size > 1; "
                                 f"got {type(alloc).__name__} with page size {alloc.page_size}")
        pool = alloc.get_kvcache()
        if getattr(pool, "kv_cache_layout", "nhd") != "nhd" or not hasattr(pool, "k_buffer"):
            raise KvsqueezeError(f"kvsqueeze fusion: needs an MHA pool with the nhd layout; got "
                                 f"{type(pool).__name__} ({getattr(pool, 'kv_cache_layout', '?')})")
        self.alloc, self.pool, self.page_size = alloc, pool, alloc.page_size
        self.layers = parse_layers(cfg.layers, pool.layer_num)
        self.fusion = OnlinePageFusion.from_config(alloc.num_pages + 1, cfg)
        self.per_request: dict[str, list[int]] = {}
        self.overcount_key, self.overcount = None, (0, 0)
        self.freed_since_admission = False
        logger.info("kvsqueeze fusion: threshold %.3g, %s similarity, page size %d, decision layers %s",
                    self.fusion.threshold, self.fusion.similarity, self.page_size,
                    f"{self.layers[0]}..{self.layers[-1]}" if self.layers else "none")

    def keys(self, pages: list[int]) -> torch.Tensor:
        ps = self.page_size
        slots = (torch.tensor(pages)[:, None] * ps + torch.arange(ps)).reshape(-1)
        slots = slots.to(self.pool.k_buffer[0].device)
        per_layer = [self.pool.k_buffer[l].index_select(0, slots).reshape(len(pages), ps, -1)
                     for l in self.layers]
        return torch.stack(per_layer, 1).float()  # compared where the pool lives (GPU or CPU)

    def stats(self) -> dict:
        return self.fusion.stats()


def _state(alloc) -> _State | None:
    return alloc.__dict__.get("_kvsqueeze_fusion")


def _ensure_state(alloc) -> _State:
    st = _state(alloc)
    if st is None:
        st = _State(alloc, _config())
        alloc.__dict__["_kvsqueeze_fusion"] = st
    return st


def fuse_request(tree, req, up_to: int) -> int:
    """Fuse the request's own new full pages below ``up_to``; returns how many fused."""
    alloc = tree.token_to_kv_pool_allocator
    st = _ensure_state(alloc)
    ps = st.page_size
    start = req.kv.cache_protected_len
    end = (up_to // ps) * ps
    if start % ps or end - start < ps:
        return 0
    rtt = tree.req_to_token_pool.req_to_token
    row = rtt[req.kv.req_pool_idx, start:end]
    pages = (row[::ps] // ps).tolist()
    indices = list(range(start // ps, end // ps))
    remap = st.fusion.fuse(pages, indices, st.keys)
    counts = st.per_request.setdefault(req.rid, [0, 0])
    counts[0] += len(pages)
    counts[1] += len(remap)
    if remap:
        offs = torch.arange(ps, device=rtt.device)
        for k, page in enumerate(pages):
            rep = remap.get(page)
            if rep is not None:
                pos = start + k * ps
                rtt[req.kv.req_pool_idx, pos:pos + ps] = (rep * ps + offs).to(rtt.dtype)
        alloc.free_page_ids(torch.tensor(list(remap), dtype=torch.int64, device=alloc.device))
        st.freed_since_admission = True
    return len(remap)


def _tree_holders(tree, n_pages: int, ps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How many unlocked and locked tree nodes hold each page (a stock or unified radix tree; the
    unified tree's core may be SGLang's Rust one, so only its flattening walks are used)."""
    def count(slots):
        slots = slots.to("cpu", torch.int64)
        return torch.bincount(slots[slots % ps == 0] // ps, minlength=n_pages)[:n_pages]

    core = getattr(tree, "tree_core", None)
    if core is not None:  # UnifiedRadixCache
        every = count(core.all_values_flatten())
        unlocked = count(core.walk_for_kv_canary(unlocked_only=True, swa_resident_only=False).slot_indices)
        return unlocked, every - unlocked
    vals = {False: [], True: []}  # RadixCache: walk its nodes
    stack = list(tree.root_node.children.values())
    while stack:
        node = stack.pop()
        if node.value is not None and len(node.value):
            vals[node.lock_ref > 0].append(node.value)
        stack.extend(node.children.values())
    empty = torch.zeros(0, dtype=torch.int64)
    return tuple(count(torch.cat(vals[k]) if vals[k] else empty) for k in (False, True))


def shared_overcount(tree, st: _State) -> tuple[int, int]:
    """Pages the tree's evictable and protected sizes count more than once, as ``(evictable,
    protected)``: a shared page held by ``e`` unlocked and ``q`` locked nodes is physically one page,
    freed by eviction only if no locked node holds it. So it counts once in evictable when ``q == 0``
    (else not at all there) and once in protected when ``q > 0``; the two sum to its extra holders.
    Walks the tree only while shared pages exist."""
    extra = st.fusion.refs.extra
    total = int(extra.sum())
    if total == 0:
        return 0, 0
    key = (st.fusion.version, evictable_raw(tree), protected_raw(tree))
    if st.overcount_key == key:
        return st.overcount
    ev, pr = _tree_holders(tree, extra.numel(), st.page_size)
    shared = extra > 0
    e, q = ev[shared], pr[shared]
    ev_over = int((e - ((q == 0) & (e > 0)).long()).sum())
    st.overcount_key, st.overcount = key, (ev_over, max(0, total - ev_over))
    return st.overcount


def evictable_raw(tree) -> int:
    core = getattr(tree, "tree_core", None)
    return core.evictable_size() if core is not None else tree.evictable_size_


def protected_raw(tree) -> int:
    core = getattr(tree, "tree_core", None)
    return core.protected_size() if core is not None else tree.protected_size_


# ---- metrics ----------------------------------------------------------------------------------


def request_meta(st: _State | None, req) -> dict:
    own, fused = st.per_request.pop(req.rid, (0, 0)) if st is not None else (0, 0)
    return {"pages": own, "fused_pages": fused, "fused_fraction": round(fused / own, 4) if own else 0.0}


# ---- install ----------------------------------------------------------------------------------


def install() -> bool:
    """Wrap SGLang's allocator, radix cache and output streamer (once per process) if fusion is on."""
    global _installed
    cfg = _config()
    if cfg is None or _installed:
        return _installed
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams
    from sglang.srt.mem_cache.radix_cache import RadixCache
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    def release_page_ids(release):
        def _release_page_ids(self, *page_ids):
            st = _state(self)
            if st is not None and page_ids:
                ids = page_ids[0] if len(page_ids) == 1 else torch.cat(page_ids)
                out = st.fusion.release(ids)
                if out.numel() == 0:
                    return
                page_ids = (out.to(ids.device, ids.dtype),)
            release(self, *page_ids)
        return _release_page_ids

    def clear(orig):
        def _clear(self):
            orig(self)
            st = _state(self)
            if st is not None:
                st.fusion.reset()
                st.per_request.clear()
        return _clear

    def evict_to_free_tokens(evict_to_free):
        def _evict_to_free_tokens(self, tree_cache, num_tokens):
            out = evict_to_free(self, tree_cache, num_tokens)
            if _state(self) is not None and tree_cache is not None and tree_cache.supports_prefix_sharing():
                while self.available_size() < num_tokens:
                    res = tree_cache.evict(EvictParams(num_tokens=num_tokens - self.available_size()))
                    if not res.num_tokens_evicted:
                        break
            return out
        return _evict_to_free_tokens

    def new_batch_prefill(orig):
        def _get_new_batch_prefill(self, running_batch):
            # SGLang stops admitting once a prefill did not fit and waits for a request to leave;
            # pages freed by fusion are room too, so the next step tries again.
            st = _state(self.token_to_kv_pool_allocator)
            if st is not None and st.freed_since_admission:
                st.freed_since_admission = False
                running_batch.batch_is_full = False
            return orig(self, running_batch)
        return _get_new_batch_prefill

    def checkpoint(orig):
        def _checkpoint(self, req, *, up_to, **kw):
            if not self.disable:
                fuse_request(self, req, up_to)
            return orig(self, req, up_to=up_to, **kw)
        return _checkpoint

    def evictable_size(orig):
        def _evictable_size(self):
            size = orig(self)
            st = _state(self.token_to_kv_pool_allocator)
            return size if st is None else max(0, size - shared_overcount(self, st)[0] * st.page_size)
        return _evictable_size

    def protected_size(orig):
        def _protected_size(self):
            size = orig(self)
            st = _state(self.token_to_kv_pool_allocator)
            return size if st is None else max(0, size - shared_overcount(self, st)[1] * st.page_size)
        return _protected_size

    def customized_info(orig):
        def build_additional_customized_info(self, reqs):
            out = orig(self, reqs)
            st = _state(self.tree_cache.token_to_kv_pool_allocator)
            if st is not None:
                stats = st.stats()
                for key, g in gauges(METRICS).items():
                    g.set(stats[key])
            return {**out, META_KEY: [[request_meta(st, r)] if r.finished() else [] for r in reqs]}
        return build_additional_customized_info

    patch(Scheduler, "get_new_batch_prefill", "fusion", new_batch_prefill)
    patch(PagedTokenToKVPoolAllocator, "_release_page_ids", "fusion", release_page_ids)
    patch(PagedTokenToKVPoolAllocator, "clear", "fusion", clear)
    patch(PagedTokenToKVPoolAllocator, "evict_to_free_tokens", "fusion", evict_to_free_tokens)
    for cls in (RadixCache, UnifiedRadixCache):  # SGLang 0.5.23 builds UnifiedRadixCache by default
        patch(cls, "checkpoint", "fusion", checkpoint)
        patch(cls, "evictable_size", "fusion", evictable_size)
        patch(cls, "protected_size", "fusion", protected_size)
    set_value(SchedulerOutputStreamer, "has_additional_customized_info", "fusion", True)
    patch(SchedulerOutputStreamer, "build_additional_customized_info", "fusion", customized_info)
    _installed = True
    logger.info("kvsqueeze fusion installed: %s", cfg)
    return True
