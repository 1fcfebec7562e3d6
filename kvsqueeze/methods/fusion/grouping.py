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

from kvsqueeze.methods.fusion.config import check_threshold
from kvsqueeze.methods.fusion.similarity import similarity_matrix


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


def fuse_layer_blocks(kb: torch.Tensor, vb: torch.Tensor, threshold: float,
                      partition: list[list[int]] | None, similarity: str, heads: int, block: int):
    """Fuse rows of key blocks ``kb`` (and value blocks ``vb`` by the same groups).

    ``partition``: candidate sets fused independently (e.g. one per block position); default all.
    Returns ``(kb', vb', groups)``.
    """
    gram = similarity_matrix(kb, similarity, heads, block)
    groups: list[list[int]] = []
    for cand in (partition if partition is not None else [list(range(kb.shape[0]))]):
        groups += group_blocks(gram, threshold, cand)
    return fuse_vectors(kb, groups), fuse_vectors(vb, groups), groups
