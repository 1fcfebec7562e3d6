"""How similar two key blocks (or two whole pages) are: the cosine of the flattened blocks (``block``,
the paper's) or the smallest per-token cosine (``token``, stricter: one token that differs, a changed
name or number, keeps its block from fusing, which a whole-block cosine over 16 tokens barely
notices)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvsqueeze.kernels.fusion_gram import block_gram
from kvsqueeze.methods.fusion.config import check_similarity


def similarity_matrix(kb: torch.Tensor, similarity: str = "block", heads: int = 1,
                      block: int = 1) -> torch.Tensor:
    """Pairwise similarity of key blocks ``kb [n, heads*block*dim]`` (flattened over heads, tokens and
    head_dim, as :func:`~kvsqueeze.methods.fusion.grouping.blocks_of` lays them out)."""
    if check_similarity(similarity) == "block":
        return block_gram(kb)[1]
    n = kb.shape[0]
    per_tok = kb.reshape(n, heads, block, -1).permute(2, 0, 1, 3).reshape(block, n, -1)
    return torch.stack([block_gram(per_tok[t])[1] for t in range(block)]).amin(0)


def page_similarity(x: torch.Tensor, cands: torch.Tensor, similarity: str = "block") -> torch.Tensor:
    """Similarity of one page ``x [layers, tokens, heads*dim]`` to each of ``cands [m, layers, tokens,
    heads*dim]`` (keys): ``[m]``, the minimum over layers (and, for ``token``, over tokens) of the cosine."""
    check_similarity(similarity)
    x, cands = x.double(), cands.double()
    if similarity == "block":
        xn = F.normalize(x.reshape(x.shape[0], -1), dim=-1)
        cn = F.normalize(cands.reshape(cands.shape[0], cands.shape[1], -1), dim=-1)
        return torch.einsum("ld,mld->ml", xn, cn).amin(-1)
    xn, cn = F.normalize(x, dim=-1), F.normalize(cands, dim=-1)
    return torch.einsum("ltd,mltd->mlt", xn, cn).flatten(1).amin(-1)


def cross_similarity(a: torch.Tensor, b: torch.Tensor, similarity: str = "block", heads: int = 1,
                     block: int = 1) -> torch.Tensor:
    """Similarity of each row of ``a [m, heads*block*dim]`` to each row of ``b [n, ...]``: ``[m, n]``
    (float64), with the layout and meaning of :func:`similarity_matrix`."""
    a, b = a.double(), b.double()
    if check_similarity(similarity) == "block":
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    def per_token(x):  # [block, rows, heads*dim], unit rows
        return F.normalize(x.reshape(x.shape[0], heads, block, -1).permute(2, 0, 1, 3)
                           .reshape(block, x.shape[0], -1), dim=-1)
    return torch.bmm(per_token(a), per_token(b).transpose(1, 2)).amin(0)
