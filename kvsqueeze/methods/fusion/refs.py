"""Reference counts of shared pages: the one structure that lets several page tables point at one
physical page, used by the SGLang adapter's pool and the TensorRT-LLM adapter's remapped tables.

``extra[p]`` counts the holders of page ``p`` beyond its first. An engine frees a page once per
holder; :meth:`PageRefs.release` absorbs a free into ``extra`` while it is positive and passes the page
on to the engine's free list only when its last holder lets go.
"""

from __future__ import annotations

import torch

from kvsqueeze.errors import KvsqueezeError, bad_value


class DoubleFree(KvsqueezeError):
    """A page was released more often than it has holders."""


class PageRefs:
    """Extra holders per page of a pool of ``num_pages`` pages (ids 0..num_pages-1)."""

    def __init__(self, num_pages: int):
        if not isinstance(num_pages, int) or num_pages < 1:
            raise bad_value("num_pages", num_pages, "a number of pages >= 1")
        self.extra = torch.zeros(num_pages, dtype=torch.int64)

    def share(self, page: int, n: int = 1) -> None:
        """``page`` gains ``n`` holders."""
        self.extra[page] += n

    def unshare(self, page: int, n: int = 1) -> None:
        """``page`` loses ``n`` extra holders that never pass through :meth:`release` (a remap undone)."""
        if int(self.extra[page]) < n:
            raise DoubleFree(f"page {page}: {n} extra holder(s) dropped, {int(self.extra[page])} held")
        self.extra[page] -= n

    @property
    def shared(self) -> int:
        """Page references served by another page (= pages saved right now)."""
        return int(self.extra.sum())

    @property
    def groups(self) -> int:
        """Pages that more than one holder points at."""
        return int((self.extra > 0).sum())

    def release(self, page_ids: torch.Tensor) -> torch.Tensor:
        """One free per entry of ``page_ids`` (a page may repeat); returns the pages now unheld."""
        ids = page_ids.reshape(-1).to("cpu", torch.int64)
        if ids.numel() == 0:
            return ids
        uniq, counts = torch.unique(ids, return_counts=True)
        ext = self.extra[uniq]
        absorbed = torch.minimum(ext, counts)
        self.extra[uniq] = ext - absorbed
        rest = counts - absorbed
        if bool((rest > 1).any()):
            bad = uniq[rest > 1][:8].tolist()
            raise DoubleFree(f"pages {bad} released more often than they are held")
        return uniq[rest == 1]

    def reset(self) -> None:
        self.extra.zero_()
