"""Online whole-page fusion for a serving engine's paged KV pool (the engine-agnostic part).

A serving engine computes a request's KV cache and then keeps it for as long as the request runs and,
with prefix caching, after it. This module decides, right after a request's prefill, which of its new
*full* pages are near-duplicates of pages already held (by running requests or by the prefix tree) at
the same page index (same token positions, so the same RoPE rotation), and keeps the reference counts
that let several page tables point at one physical page:

- **Representatives.** Every new full page that does not fuse becomes a representative for its page
  index. A representative is never written again (only full pages are considered; decode writes the
  last, partial page), so fusing into it changes nothing for the requests already reading it.
- **Decision.** A new page fuses into the most similar live representative at its page index when that
  similarity is at or above the threshold. Similarity of two whole pages = the minimum, over the
  decision layers (default: all but the first two and the last two), of the cosine of the key blocks
  flattened over (tokens, heads, head_dim) (``block``), or of the per-token key cosines (``token``:
  the minimum over the page's tokens as well; stricter). Because the representative is immutable,
  the fused page *is* the representative (every member reads it in every layer): each member is within
  the threshold of the page it reads, which is the property quality depends on. (The batch method,
  ``fusion.fuse_batch(..., shared_pages=True)``, fuses a whole batch at once into the members' mean.)
- **Reference counts**: :class:`~kvsqueeze.methods.fusion.refs.PageRefs`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from kvsqueeze.errors import bad_value
from kvsqueeze.methods.fusion.config import (
    DEFAULT_MAX_CANDIDATES,
    DEFAULT_SIMILARITY,
    FusionConfig,
    check_similarity,
    check_threshold,
)
from kvsqueeze.methods.fusion.refs import PageRefs
from kvsqueeze.methods.fusion.similarity import page_similarity


@dataclass
class FusionCounters:
    pages_checked: int = 0  # new full pages considered
    pages_fused: int = 0  # of those, pages that now read a representative (cumulative)
    requests: int = 0

    def as_dict(self) -> dict:
        return {"pages_checked": self.pages_checked, "pages_fused": self.pages_fused,
                "requests": self.requests}


@dataclass
class OnlinePageFusion:
    """Fusion state of one paged pool: reference counts, live representatives per page index, counters."""

    num_pages: int
    threshold: float
    similarity: str = DEFAULT_SIMILARITY
    max_candidates: int = DEFAULT_MAX_CANDIDATES
    refs: PageRefs = field(init=False)
    counters: FusionCounters = field(default_factory=FusionCounters)

    def __post_init__(self):
        self.threshold = check_threshold(self.threshold)
        check_similarity(self.similarity)
        if not isinstance(self.max_candidates, int) or self.max_candidates < 1:
            raise bad_value("max_candidates", self.max_candidates, "an integer >= 1")
        self.refs = PageRefs(self.num_pages)
        self.index_of = torch.full((self.num_pages,), -1, dtype=torch.int64)
        self.reps: dict[int, OrderedDict[int, None]] = {}
        self.version = 0  # bumped whenever reference counts may have changed

    @classmethod
    def from_config(cls, num_pages: int, cfg: FusionConfig) -> "OnlinePageFusion":
        return cls(num_pages, cfg.threshold, cfg.similarity, cfg.max_candidates)

    # ---- engine frees ----------------------------------------------------------------------
    def release(self, page_ids: torch.Tensor) -> torch.Tensor:
        """Apply the engine's frees; returns the pages that go back to its free list (and forgets them
        as representatives)."""
        self.version += 1
        out = self.refs.release(page_ids)
        if out.numel():
            idx = self.index_of[out]
            for p, b in zip(out[idx >= 0].tolist(), idx[idx >= 0].tolist()):
                self.reps[b].pop(p, None)
            self.index_of[out] = -1
        return out

    def reset(self) -> None:
        self.version += 1
        self.refs.reset()
        self.index_of.fill_(-1)
        self.reps.clear()

    # ---- fusion ----------------------------------------------------------------------------
    def candidates(self, index: int) -> list[int]:
        reps = self.reps.get(index)
        return list(reps)[-self.max_candidates:] if reps else []

    def fuse(self, pages: list[int], indices: list[int], keys) -> dict[int, int]:
        """Decide for a request's new full ``pages`` (at page ``indices``); ``keys(page_ids)`` returns
        their keys ``[n, layers, tokens, heads*dim]`` over the decision layers.

        Returns ``{page: representative}`` for the pages that fuse. For each, the caller points its
        page table at the representative and then frees the page once (the representative has gained a
        holder here). Pages that do not fuse become representatives for their index.
        """
        if len(pages) != len(indices):
            raise bad_value("indices", len(indices), f"one page index per page ({len(pages)})")
        self.counters.requests += 1
        self.counters.pages_checked += len(pages)
        cands = {i: self.candidates(i) for i in set(indices)}
        wanted = sorted({p for c in cands.values() for p in c} | set(pages))
        if not wanted:
            return {}
        row = {p: k for k, p in enumerate(wanted)}
        kk = keys(wanted)
        out: dict[int, int] = {}
        for page, index in zip(pages, indices):
            cand = cands[index]
            if cand:
                sim = page_similarity(kk[row[page]], kk[[row[c] for c in cand]], self.similarity)
                best = int(torch.argmax(sim))
                if float(sim[best]) >= self.threshold:
                    rep = cand[best]
                    out[page] = rep
                    self.refs.share(rep)
                    continue
            self.index_of[page] = index
            self.reps.setdefault(index, OrderedDict())[page] = None
        self.counters.pages_fused += len(out)
        self.version += 1
        return out

    def stats(self) -> dict:
        return {**self.counters.as_dict(), "pages_saved": self.refs.shared,
                "groups": self.refs.groups}
