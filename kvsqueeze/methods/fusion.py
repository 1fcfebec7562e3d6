"""Joint encoding of KV-cache blocks: fuse similar blocks into one shared block (arXiv 2601.03067).

Engine-agnostic part (the SGLang shared-page pool is separate). Definitions used throughout:

- A *block* is ``block_size`` consecutive token positions of one layer, all KV heads: its key block
  flattened over (heads, tokens, head_dim) is one vector; so is its value block. Only full blocks fuse.
- Blocks fuse only in the fused layer range (default: all but the first two and the last two layers).
- *Grouping* (recursive binary split): a candidate set is accepted as one group when every pair of
  its key blocks has cosine similarity >= ``threshold`` (complete linkage, so a set with no pair at the
  threshold is never fused). Otherwise it is split in two around its least similar pair (each member
  goes to the pivot it is more similar to; ties to the first) and each half is split again. Every
  member of an accepted group is then within the threshold of every other and of the group's
  representative.
- The *fused* key block is the renormalised mean of the members' unit key vectors; a member is
  restored as that unit vector times the member's own key norm. Values follow the key-derived groups:
  the renormalised mean of the members' unit value vectors, times each member's own value norm.
- Storage: one 16-bit block per group, plus per member a 16-bit key norm, a 16-bit value norm and a
  4-byte group index. Identical blocks fuse losslessly (their mean is themselves).

Two uses: *BFF* across requests (``fuse_batch``: blocks at the same positions of different requests'
caches; radix-shared pages are already one copy) and *CFF* across the chunks of one long input
(method ``fusion`` for ``kvsqueeze eval``: the full blocks of a prefix's compressible middle, any
positions, fused with one another).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvsqueeze.errors import bad_value
from kvsqueeze.kernels.fusion_gram import block_gram
from kvsqueeze.methods.base import (
    DENSE_BYTES_PER_ELEMENT,
    CompressedPrefix,
    CompressionMethod,
    PrefixCache,
    register,
)

DEFAULT_BLOCK = 16
DEFAULT_THRESHOLD = 0.8
NORM_BYTES = 2
INDEX_BYTES = 4


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
            not 0 < threshold <= 1:
        raise bad_value("threshold", threshold, "a cosine similarity in (0, 1]")
    return float(threshold)


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise bad_value("block_size", block_size, "a number of tokens per block >= 1")
    return block_size


def default_layers(n_layers: int) -> list[int]:
    """All but the first two and the last two layers (the paper's range)."""
    return list(range(2, max(2, n_layers - 2)))


def parse_layers(spec, n_layers: int) -> list[int]:
    """``None`` (default range), ``"a-b"`` (inclusive), ``"all"`` or a list of layer indices."""
    if spec is None:
        return default_layers(n_layers)
    if spec == "all":
        return list(range(n_layers))
    if isinstance(spec, str):
        a, dash, b = spec.partition("-")
        try:
            layers = list(range(int(a), int(b) + 1)) if dash else [int(x) for x in spec.split(",")]
        except ValueError:
            raise bad_value("layers", spec, "a range a-b, a comma-separated list, or all")
    else:
        layers = list(spec)
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise bad_value("layers", spec, f"layer indices in 0..{n_layers - 1}")
    return sorted(set(layers))


def group_blocks(gram: torch.Tensor, threshold: float,
                 candidates: list[int] | None = None) -> list[list[int]]:
    """Groups of ``candidates`` (default: all rows of ``gram``) by recursive binary split.

    Returns every candidate exactly once, each group sorted, groups ordered by their first member.
    """
    threshold = check_threshold(threshold)
    idx = list(range(gram.shape[0])) if candidates is None else list(candidates)
    g = gram.double()
    out: list[list[int]] = []
    stack = [idx] if idx else []
    while stack:
        s = stack.pop()
        if len(s) == 1:
            out.append(s)
            continue
        t = torch.tensor(s)
        sub = g[t][:, t]
        flat = int(torch.argmin(sub))
        i, j = divmod(flat, len(s))
        if sub[i, j] >= threshold:
            out.append(sorted(s))
            continue
        to_i = sub[:, i] >= sub[:, j]
        to_i[i], to_i[j] = True, False
        left = [s[k] for k in range(len(s)) if to_i[k]]
        right = [s[k] for k in range(len(s)) if not to_i[k]]
        stack += [right, left]
    return sorted(out, key=lambda grp: grp[0])


def fuse_vectors(x: torch.Tensor, groups: list[list[int]], own_norms: bool = True) -> torch.Tensor:
    """Each member replaced by its group's renormalised mean direction times its own norm (or, with
    ``own_norms=False``, the group's mean norm: one block shared by every member)."""
    out = x.clone()
    for grp in groups:
        if len(grp) < 2:
            continue
        t = torch.tensor(grp)
        m = x[t].double()
        norms = m.norm(dim=1)
        mean = (m / norms.clamp_min(1e-12)[:, None]).mean(0)
        mean = mean / mean.norm().clamp_min(1e-12)
        scale = norms[:, None] if own_norms else norms.mean()
        out[t] = (scale * mean[None]).to(x.dtype)
    return out


def blocks_of(x: torch.Tensor, start: int, n_blocks: int, block: int) -> torch.Tensor:
    """``x [heads, tokens, dim]`` -> ``[n_blocks, heads*block*dim]`` for tokens from ``start``."""
    h, _, d = x.shape
    y = x[:, start:start + n_blocks * block].reshape(h, n_blocks, block, d)
    return y.permute(1, 0, 2, 3).reshape(n_blocks, h * block * d)


def unblock(blocks: torch.Tensor, heads: int, block: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`blocks_of`: ``[n_blocks, heads*block*dim]`` -> ``[heads, n*block, dim]``."""
    n = blocks.shape[0]
    return blocks.reshape(n, heads, block, dim).permute(1, 0, 2, 3).reshape(heads, n * block, dim)


@dataclass
class LayerFusion:
    layer: int
    candidates: int
    groups: list[list[int]]

    @property
    def saved(self) -> int:
        return sum(len(g) - 1 for g in self.groups)


@dataclass
class FusionStats:
    block_size: int
    threshold: float
    layers: list[int]
    per_layer: list[LayerFusion] = field(default_factory=list)

    @property
    def candidates(self) -> int:
        return sum(lf.candidates for lf in self.per_layer)

    @property
    def saved(self) -> int:
        return sum(lf.saved for lf in self.per_layer)

    @property
    def fused_groups(self) -> int:
        return sum(sum(len(g) > 1 for g in lf.groups) for lf in self.per_layer)


SIMILARITIES = ("block", "token")


def check_similarity(similarity) -> str:
    if similarity not in SIMILARITIES:
        raise bad_value("similarity", similarity, f"one of {', '.join(SIMILARITIES)}")
    return similarity


def similarity_matrix(kb: torch.Tensor, similarity: str = "block", heads: int = 1,
                      block: int = 1) -> torch.Tensor:
    """Pairwise similarity of key blocks ``kb [n, heads*block*dim]``.

    ``block`` (the paper's): cosine of the whole flattened blocks. ``token``: the smallest, over the
    block's token positions, of the cosine of that token's keys flattened over heads; stricter: one
    token that differs (a changed name or number) keeps its block from fusing, which a whole-block
    cosine over 16 tokens barely notices.
    """
    if check_similarity(similarity) == "block":
        return block_gram(kb)[1]
    n = kb.shape[0]
    per_tok = kb.reshape(n, heads, block, -1).permute(2, 0, 1, 3).reshape(block, n, -1)
    return torch.stack([block_gram(per_tok[t])[1] for t in range(block)]).amin(0)


def fuse_layer_blocks(kb: torch.Tensor, vb: torch.Tensor, threshold: float,
                      partition: list[list[int]] | None = None, similarity: str = "block",
                      heads: int = 1, block: int = 1):
    """Fuse rows of key blocks ``kb`` (and value blocks ``vb`` by the same groups).

    ``partition``: candidate sets fused independently (e.g. one per block position); default all.
    Returns ``(kb', vb', groups)``.
    """
    gram = similarity_matrix(kb, similarity, heads, block)
    groups: list[list[int]] = []
    for cand in (partition if partition is not None else [list(range(kb.shape[0]))]):
        groups += group_blocks(gram, threshold, cand)
    return fuse_vectors(kb, groups), fuse_vectors(vb, groups), groups


@register
class BlockFusion(CompressionMethod):
    """CFF: fuse similar full blocks of one prefix's compressible middle (any positions)."""

    name = "fusion"
    summary = "joint block encoding: fuse similar KV blocks (threshold) into shared blocks"
    ratio_unit = "bytes held (one block per group + per-member norms and index) vs dense 16-bit"

    def __init__(self, ratio=None, sinks=4, recent=64, threshold: float = DEFAULT_THRESHOLD,
                 block_size: int = DEFAULT_BLOCK, layers=None, similarity: str = "block",
                 **options):
        super().__init__(1.0 if ratio is None else ratio, sinks, recent, **options)
        self.similarity = check_similarity(similarity)
        self.threshold = check_threshold(threshold)
        self.block_size = check_block_size(block_size)
        self.layers_spec = layers

    def describe(self) -> str:
        return f"fusion@t{self.threshold:g}" + ("" if self.similarity == "block" else "/token")

    def compress(self, cache: PrefixCache) -> CompressedPrefix:
        n, h, d, b = cache.n_tokens, cache.kv_heads, cache.head_dim, self.block_size
        start, end = self.exempt_slices(n)
        nb = (end - start) // b
        layers = parse_layers(self.layers_spec, cache.n_layers)
        stats = FusionStats(b, self.threshold, layers)
        keys, values = list(cache.keys), list(cache.values)
        block_bytes = 2 * h * b * d * DENSE_BYTES_PER_ELEMENT
        held = cache.dense_bytes()
        for layer in layers if nb >= 2 else []:
            kb = blocks_of(cache.keys[layer], start, nb, b)
            vb = blocks_of(cache.values[layer], start, nb, b)
            kf, vf, groups = fuse_layer_blocks(kb, vb, self.threshold, None, self.similarity,
                                               h, b)
            lf = LayerFusion(layer, nb, groups)
            stats.per_layer.append(lf)
            if not lf.saved:
                continue
            k = cache.keys[layer].clone()
            v = cache.values[layer].clone()
            k[:, start:start + nb * b] = unblock(kf, h, b, d)
            v[:, start:start + nb * b] = unblock(vf, h, b, d)
            keys[layer], values[layer] = k, v
            fused_members = sum(len(g) for g in groups if len(g) > 1)
            held += (-lf.saved * block_bytes
                     + fused_members * (2 * NORM_BYTES + INDEX_BYTES))
        details = {"threshold": self.threshold, "blocks_fused_away": float(stats.saved),
                   "fused_share": stats.saved / max(stats.candidates, 1),
                   "groups": float(stats.fused_groups)}
        return CompressedPrefix(keys=keys, values=values, evicted=None, bytes_held=int(held),
                                dense_bytes=cache.dense_bytes(), details=details)


# ---------------------------------------------------------------------------------------------
# BFF: across the requests of a batch, on top of exact (radix) prefix sharing
# ---------------------------------------------------------------------------------------------
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
               keep_first_blocks: int = 0, similarity: str = "block",
               shared_pages: bool = False, online: bool = False) -> BatchFusion:
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
    (``kvsqueeze.methods.fusion_online``): requests arrive in order; each new page fuses into the most
    similar earlier unfused page at its block index (if at the threshold) and then *reads that page*,
    unchanged, in every layer.
    """
    threshold = check_threshold(threshold)
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
                                           partition, similarity, h, block_size)
        lf = LayerFusion(layer, len(b.full), groups)
        stats.per_layer.append(lf)
        layer_pages[layer] -= lf.saved
        if lf.saved:
            b.write(keys, values, layer, kf, vf)
    return BatchFusion(keys, values, pages, b.distinct, layer_pages, stats)


def _fuse_online(b: _Batch, keys, values, pages, layer_ids, threshold, similarity, stats) -> BatchFusion:
    from kvsqueeze.methods.fusion_online import OnlinePageFusion

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

