"""Grouping similar blocks and fusing each group into one block.

- A *block* is ``block_size`` consecutive token positions of one layer, all KV heads: its key block
  flattened over (heads, tokens, head_dim) is one vector; so is its value block. Only full blocks fuse.
- *Grouping* (recursive binary split): a candidate set is accepted as one group when every pair of
  its key blocks has similarity >= ``threshold`` (complete linkage, so a set with no pair at the
  threshold is never fused). Otherwise it is split in two around its least similar pair (each member
  goes to the pivot it is more similar to; ties to the first) and each half is split again. Every
  member of an accepted group is then within the threshold of every other and of the group's
  representative.
- The *fused* key block is the renormalised mean of the members' unit key vectors; a member is
  restored as that unit vector times the member's own key norm. Values follow the key-derived groups:
  the renormalised mean of the members' unit value vectors, times each member's own value norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvsqueeze.methods.fusion.config import DEFAULT_GROUPING, check_grouping, check_threshold
from kvsqueeze.methods.fusion.similarity import cross_similarity, similarity_matrix


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


def group_items(vectors: list[torch.Tensor], n_deciding: int, items: list[list[int]], threshold: float,
                similarity: str = "block", heads: int = 1, block: int = 1
                ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The paper's grouping: recursive halving of the list of ``items`` (each a list of row indices,
    e.g. the blocks of one request or chunk), merging left and right representatives at each level.

    ``vectors``: tensors ``[n, D_j]`` merged along the same tree; the first ``n_deciding`` decide
    (their similarities' minimum is compared with the threshold: several layers' keys deciding one
    shared page), the rest follow (values, other layers). Returns the groups (each sorted, ordered by
    first member; every row of the items exactly once) and, per vector, the unit representative of
    each group ``[n_groups, D_j]`` (float64).
    """
    threshold = check_threshold(threshold)
    if not 1 <= n_deciding <= len(vectors):
        raise ValueError(f"n_deciding={n_deciding}: expected 1..{len(vectors)}")
    items = [list(it) for it in items if len(it)]

    def leaf(rows):
        t = torch.tensor(rows)
        return [[r] for r in rows], [F.normalize(v[t].double(), dim=-1) for v in vectors]

    def merge(lo: int, hi: int):
        if hi - lo == 1:
            return leaf(items[lo])
        mid = lo + (hi - lo) // 2
        gl, rl = merge(lo, mid)
        gr, rr = merge(mid, hi)
        sim = None
        for j in range(n_deciding):
            s = cross_similarity(rl[j], rr[j], similarity, heads, block)
            sim = s if sim is None else torch.minimum(sim, s)
        best = sim.max(0)  # each right representative: its most similar left one
        joins: dict[int, list[int]] = {}
        for r in range(len(gr)):
            if best.values[r] >= threshold:
                joins.setdefault(int(best.indices[r]), []).append(r)
        groups, keep_l, keep_r, merged = [], [], [], []
        for l in range(len(gl)):
            if l in joins:
                rs = joins[l]
                groups.append(gl[l] + [m for r in rs for m in gr[r]])
                merged.append((l, rs))
            else:
                keep_l.append(l)
        matched = {r for rs in joins.values() for r in rs}
        keep_r = [r for r in range(len(gr)) if r not in matched]
        groups += [gl[l] for l in keep_l] + [gr[r] for r in keep_r]
        reps = []
        for a, b in zip(rl, rr):
            fused = [F.normalize(torch.cat([a[l:l + 1], b[rs]]).mean(0), dim=-1) for l, rs in merged]
            parts = ([torch.stack(fused)] if fused else []) + [a[keep_l], b[keep_r]]
            reps.append(torch.cat(parts))
        return groups, reps

    if not items:
        return [], [v.new_zeros((0, v.shape[1])).double() for v in vectors]
    groups, reps = merge(0, len(items))
    order = sorted(range(len(groups)), key=lambda g: min(groups[g]))
    return [sorted(groups[g]) for g in order], [r[torch.tensor(order)] for r in reps]


def apply_representatives(x: torch.Tensor, groups: list[list[int]], reps: torch.Tensor,
                          own_norms: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """Members of each group of two or more replaced by the group's unit representative times their
    own norm (or, ``own_norms=False``, the members' mean norm: one block every member shares); into
    ``out`` (default a copy of ``x``)."""
    out = x.clone() if out is None else out
    for grp, rep in zip(groups, reps):
        if len(grp) < 2:
            continue
        t = torch.tensor(grp)
        norms = x[t].double().norm(dim=1)
        scale = norms[:, None] if own_norms else norms.mean()
        out[t] = (scale * rep[None]).to(x.dtype)
    return out


def fuse_vectors(x: torch.Tensor, groups: list[list[int]], own_norms: bool = True) -> torch.Tensor:
    """Each member replaced by its group's renormalised mean direction times its own norm (or, with
    ``own_norms=False``, the group's mean norm: one block shared by every member)."""
    reps = [F.normalize(F.normalize(x[torch.tensor(grp)].double(), dim=1).mean(0), dim=0)
            if len(grp) > 1 else None for grp in groups]
    return apply_representatives(x, groups, reps, own_norms)

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


def items_of(candidates: list[int], item_of: list | None) -> list[list[int]]:
    """``candidates`` split by the item (request, chunk) each belongs to, items in order of first
    appearance; ``item_of`` None: every candidate is an item of its own."""
    if item_of is None:
        return [[c] for c in candidates]
    by: dict = {}
    for c in candidates:
        by.setdefault(item_of[c], []).append(c)
    return list(by.values())


def fuse_layer_blocks(kb: torch.Tensor, vb: torch.Tensor, threshold: float,
                      partition: list[list[int]] | None, similarity: str, heads: int, block: int,
                      grouping: str = DEFAULT_GROUPING, item_of: list | None = None):
    """Fuse rows of key blocks ``kb`` (and value blocks ``vb`` by the same groups).

    ``partition``: candidate sets fused independently (e.g. one per block position); default all.
    ``grouping``: ``batch`` (the paper's, over the items ``item_of`` gives each row: rows of one item
    never fuse with each other; None: each row its own item) or ``split``.
    Returns ``(kb', vb', groups)``.
    """
    cands = partition if partition is not None else [list(range(kb.shape[0]))]
    if check_grouping(grouping) == "batch":
        kf, vf, groups = kb.clone(), vb.clone(), []
        for cand in cands:
            g, (rk, rv) = group_items([kb, vb], 1, items_of(cand, item_of), threshold, similarity,
                                      heads, block)
            apply_representatives(kb, g, rk, out=kf)
            apply_representatives(vb, g, rv, out=vf)
            groups += g
        return kf, vf, sorted(groups, key=lambda grp: grp[0])
    gram = similarity_matrix(kb, similarity, heads, block)
    groups: list[list[int]] = []
    for cand in cands:
        groups += group_blocks(gram, threshold, cand)
    return fuse_vectors(kb, groups), fuse_vectors(vb, groups), groups

