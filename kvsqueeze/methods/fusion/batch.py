"""BFF: block fusion across the requests of a batch, on top of exact (radix) prefix sharing, for the
batch evaluation (``kvsqueeze eval --method fusion --workload ...``): the distinct full pages of a
batch, pages whose token prefix agrees already being one copy, fused per layer (or as whole pages in
every layer, as a token-slot pool such as SGLang's holds them, or in arrival order as the SGLang
integration decides)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.cache import PrefixCache
from kvsqueeze.errors import bad_value
from kvsqueeze.methods.fusion.config import (
    DEFAULT_BLOCK,
    DEFAULT_GROUPING,
    DEFAULT_SIMILARITY,
    check_block_size,
    check_grouping,
    check_threshold,
    parse_layers,
)
from kvsqueeze.methods.fusion.grouping import (
    FusionStats,
    LayerFusion,
    apply_representatives,
    fuse_layer_blocks,
    fuse_vectors,
    group_blocks,
    group_items,
    items_of,
)
from kvsqueeze.methods.fusion.online import OnlinePageFusion
from kvsqueeze.methods.fusion.similarity import similarity_matrix


def radix_pages(token_lists: list[list[int]], page: int) -> list[list[tuple]]:
    """Per request, the id of each of its pages under exact prefix sharing.

    A full page's id is the token prefix up to its end (two requests share it exactly when their
    tokens agree up to there, as in a radix tree with that page size); a partial last page is private.
    """
    out = []
    for r, toks in enumerate(token_lists):
        ids = []
        for p in range(-(-len(toks) // page)):
            end = (p + 1) * page
            ids.append(("full", tuple(toks[:end])) if end <= len(toks) else ("partial", r))
        out.append(ids)
    return out


@dataclass
class BatchFusion:
    """Caches of a batch after fusion, and what they hold."""

    keys: list[list[torch.Tensor]]  # per request, per layer
    values: list[list[torch.Tensor]]
    pages_dense: int  # every request's own pages
    pages_radix: int  # distinct pages with exact prefix sharing
    layer_pages_fused: list[int]  # per layer: pages held with radix + fusion
    stats: FusionStats

    @property
    def pages_fused(self) -> float:
        """Pages held with radix + fusion, in whole-model pages (mean over layers)."""
        return sum(self.layer_pages_fused) / len(self.layer_pages_fused)


@dataclass
class _Batch:
    """The distinct pages of a batch after exact prefix sharing, and who owns each."""

    caches: list[PrefixCache]
    block: int
    page_ids: list[list[tuple]]
    owner: dict[tuple, tuple[int, int]]
    full: list[tuple]  # distinct full pages that may fuse

    @property
    def distinct(self) -> int:
        return len(self.owner)

    def blocks(self, layer: int, key: bool) -> torch.Tensor:
        return torch.stack([_block(self.caches, self.owner[pid], layer, self.block, key)
                            for pid in self.full])

    def requests(self) -> list[int]:
        """The request that owns each candidate page (the items of the paper's grouping)."""
        return [self.owner[pid][0] for pid in self.full]

    def partition(self, same_position: bool) -> list[list[int]]:
        if not same_position:
            return [list(range(len(self.full)))]
        by_pos: dict[int, list[int]] = {}
        for i, pid in enumerate(self.full):
            by_pos.setdefault(self.owner[pid][1], []).append(i)
        return [by_pos[p] for p in sorted(by_pos)]

    def write(self, keys, values, layer: int, kf: torch.Tensor, vf: torch.Tensor) -> None:
        """Give every request's copy of a candidate page the fused block of that page."""
        h, d = self.caches[0].kv_heads, self.caches[0].head_dim
        row = {pid: i for i, pid in enumerate(self.full)}
        for r, ids in enumerate(self.page_ids):
            k = keys[r][layer] = keys[r][layer].clone()
            v = values[r][layer] = values[r][layer].clone()
            for p, pid in enumerate(ids):
                if pid in row:
                    sl = slice(p * self.block, (p + 1) * self.block)
                    k[:, sl] = kf[row[pid]].reshape(h, self.block, d)
                    v[:, sl] = vf[row[pid]].reshape(h, self.block, d)


def _batch(caches, token_lists, block_size, keep_first_blocks) -> _Batch:
    if len(caches) != len(token_lists):
        raise bad_value("token_lists", len(token_lists), f"one token list per cache ({len(caches)})")
    for c, t in zip(caches, token_lists):
        if c.n_tokens != len(t):
            raise bad_value("token_lists", len(t), f"as many tokens as the cache ({c.n_tokens})")
    page_ids = radix_pages(token_lists, block_size)
    owner: dict[tuple, tuple[int, int]] = {}
    for r, ids in enumerate(page_ids):
        for p, pid in enumerate(ids):
            owner.setdefault(pid, (r, p))
    full = [pid for pid in owner if pid[0] == "full" and owner[pid][1] >= keep_first_blocks]
    return _Batch(caches, block_size, page_ids, owner, full)


def fuse_batch(caches: list[PrefixCache], token_lists: list[list[int]], threshold: float,
               block_size: int = DEFAULT_BLOCK, layers=None, same_position: bool = True,
               keep_first_blocks: int = 0, similarity: str = DEFAULT_SIMILARITY,
               shared_pages: bool = False, online: bool = False,
               grouping: str = DEFAULT_GROUPING) -> BatchFusion:
    """BFF over the distinct full pages of a batch (radix-shared pages are one copy already).

    ``same_position``: only pages at the same block index fuse (keeps RoPE positions consistent:
    a request's page is replaced by a block made from keys at the same positions).
    ``keep_first_blocks``: blocks never fused at the start of every sequence (attention sinks).
    ``shared_pages``: what a token-slot pool like SGLang's stock one can hold, where one page is one
    physical copy of every layer: pages fuse only if they fuse in every fused layer (similarity = the
    minimum over those layers), and a fused page is one shared block in *every* layer (the members'
    mean direction times their mean norm: members do not keep their own norms, and the layers outside
    the fused range are shared too).
    ``online`` (with ``shared_pages``): what the SGLang integration does
    (:mod:`kvsqueeze.methods.fusion.online`): requests arrive in order; each new page fuses into the most
    similar earlier unfused page at its block index (if at the threshold) and then *reads that page*,
    unchanged, in every layer.
    ``grouping``: ``batch`` (the paper's: the batch of requests halved recursively, pages of one
    request never fused with each other) or ``split`` (see :mod:`kvsqueeze.methods.fusion.grouping`).
    """
    threshold = check_threshold(threshold)
    grouping = check_grouping(grouping)
    block_size = check_block_size(block_size)
    b = _batch(caches, token_lists, block_size, keep_first_blocks)
    n_layers, h = caches[0].n_layers, caches[0].kv_heads
    layer_ids = parse_layers(layers, n_layers)
    stats = FusionStats(block_size, threshold, layer_ids)
    keys = [list(c.keys) for c in caches]
    values = [list(c.values) for c in caches]
    pages = sum(len(ids) for ids in b.page_ids)
    if len(b.full) < 2:
        return BatchFusion(keys, values, pages, b.distinct, [b.distinct] * n_layers, stats)
    partition = b.partition(same_position)
    if online:
        if not (shared_pages and same_position):
            raise bad_value("online", online, "to be used with shared_pages=True and same_position=True")
        return _fuse_online(b, keys, values, pages, layer_ids, threshold, similarity, stats)
    if shared_pages and grouping == "batch":
        return _fuse_shared_batch(b, keys, values, pages, layer_ids, partition, threshold,
                                  similarity, stats)
    if shared_pages:
        sim = None
        for layer in layer_ids:
            s_l = similarity_matrix(b.blocks(layer, True), similarity, h, block_size)
            sim = s_l if sim is None else torch.minimum(sim, s_l)
        groups = [g for cand in partition for g in group_blocks(sim, threshold, cand)]
        lf = LayerFusion(-1, len(b.full), groups)
        stats.per_layer.append(lf)
        if lf.saved:
            for layer in range(n_layers):
                b.write(keys, values, layer, fuse_vectors(b.blocks(layer, True), groups, False),
                        fuse_vectors(b.blocks(layer, False), groups, False))
        return BatchFusion(keys, values, pages, b.distinct, [b.distinct - lf.saved] * n_layers,
                           stats)
    layer_pages = [b.distinct] * n_layers
    for layer in layer_ids:
        kf, vf, groups = fuse_layer_blocks(b.blocks(layer, True), b.blocks(layer, False), threshold,
                                           partition, similarity, h, block_size, grouping,
                                           b.requests())
        lf = LayerFusion(layer, len(b.full), groups)
        stats.per_layer.append(lf)
        layer_pages[layer] -= lf.saved
        if lf.saved:
            b.write(keys, values, layer, kf, vf)
    return BatchFusion(keys, values, pages, b.distinct, layer_pages, stats)


def _fuse_shared_batch(b: _Batch, keys, values, pages, layer_ids, partition, threshold, similarity,
                       stats) -> BatchFusion:
    """Whole pages, the paper's grouping: the fused layers' keys decide together (the minimum of their
    similarities), and every layer's keys and values follow the same merges; each member page reads
    the merged block times the members' mean norm."""
    c0 = b.caches[0]
    n_layers, h = c0.n_layers, c0.kv_heads
    rest = [b.blocks(layer, key) for layer in range(n_layers) for key in (True, False)]
    deciding = [rest[2 * layer] for layer in layer_ids]  # the fused layers' keys, gathered once
    owners = b.requests()
    groups, reps = [], [x.clone() for x in rest]
    for cand in partition:
        g, r = group_items(deciding + rest, len(deciding), items_of(cand, owners), threshold,
                           similarity, h, b.block)
        for j, x in enumerate(rest):
            apply_representatives(x, g, r[len(deciding) + j], own_norms=False, out=reps[j])
        groups += g
    lf = LayerFusion(-1, len(b.full), sorted(groups, key=lambda grp: grp[0]))
    stats.per_layer.append(lf)
    if lf.saved:
        for layer in range(n_layers):
            b.write(keys, values, layer, reps[2 * layer], reps[2 * layer + 1])
    return BatchFusion(keys, values, pages, b.distinct, [b.distinct - lf.saved] * n_layers, stats)


def _fuse_online(b: _Batch, keys, values, pages, layer_ids, threshold, similarity, stats) -> BatchFusion:
    c0 = b.caches[0]
    h, d, blk = c0.kv_heads, c0.head_dim, b.block
    kk = torch.stack([torch.stack([b.blocks(l, True)[i].reshape(h, blk, d).transpose(0, 1).reshape(blk, h * d)
                                   for l in layer_ids]) for i in range(len(b.full))])
    fus = OnlinePageFusion(len(b.full), threshold, similarity)
    rep_of = list(range(len(b.full)))
    for r in range(len(b.caches)):
        own = [i for i, pid in enumerate(b.full) if b.owner[pid][0] == r]
        for i, rep in fus.fuse(own, [b.owner[b.full[i]][1] for i in own], lambda ps: kk[ps]).items():
            rep_of[i] = rep
    groups: dict[int, list[int]] = {}
    for i, rep in enumerate(rep_of):
        groups.setdefault(rep, []).append(i)
    lf = LayerFusion(-1, len(b.full), sorted(groups.values()))
    stats.per_layer.append(lf)
    if lf.saved:
        idx = torch.tensor(rep_of)
        for layer in range(c0.n_layers):
            b.write(keys, values, layer, b.blocks(layer, True)[idx], b.blocks(layer, False)[idx])
    n_layers = c0.n_layers
    return BatchFusion(keys, values, pages, b.distinct, [b.distinct - lf.saved] * n_layers, stats)


def _block(caches, where, layer, block, key: bool) -> torch.Tensor:
    r, p = where
    x = (caches[r].keys if key else caches[r].values)[layer]
    return x[:, p * block:(p + 1) * block].reshape(-1)

