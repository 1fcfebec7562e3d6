"""Shared, ref-counted KV pages: the engine-agnostic bookkeeping behind block fusion in a paged pool.

Every sequence has a block table (page indices, one per ``page_size`` tokens). Fusion makes several
table entries point at one page, which becomes immutable, and returns the pages they pointed at to the
free list, so that the engine can give them to other requests. Rules:

- only full blocks fuse (a partial last block is still being written);
- nothing writes into a shared or immutable page (``check_writable`` says so before an append);
- a page is free exactly when no table points at it (finish and abort both release a sequence);
- other holders (an engine's radix tree, a connector's in-flight transfer) take references with
  ``retain`` / ``release_page`` like a sequence would.

An engine adapter keeps its own page arrays in step with this pool (SGLang: ``req_to_token`` rows;
TensorRT-LLM: the block tables in the attention metadata): ``fuse`` returns the remapping it made.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.errors import KvsqueezeError, bad_value


class PoolExhausted(KvsqueezeError):
    """Not enough free pages; nothing was allocated."""


@dataclass(frozen=True)
class Remap:
    seq: object
    block: int
    old_page: int
    new_page: int


class SharedPagePool:
    def __init__(self, num_pages: int, page_size: int):
        if not isinstance(num_pages, int) or num_pages < 1:
            raise bad_value("num_pages", num_pages, "a number of pages >= 1")
        if not isinstance(page_size, int) or page_size < 2:
            raise bad_value("page_size", page_size,
                            "a page size above 1 (fusion shares whole pages; page size 1 has none)")
        self.num_pages, self.page_size = num_pages, page_size
        self.ref = [0] * num_pages
        self.free_list = list(range(num_pages - 1, -1, -1))
        self.tables: dict[object, list[int]] = {}
        self.tokens: dict[object, int] = {}
        self.immutable: set[int] = set()
        self.extra_refs = [0] * num_pages  # references held outside block tables
        self.fused_away = 0  # pages returned to the free list by fusion, cumulative

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return len(self.free_list)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self.free_list)

    def logical_pages(self) -> int:
        """Table entries over all sequences (what the pool would hold without sharing)."""
        return sum(len(t) for t in self.tables.values())

    # ---- allocation ------------------------------------------------------------------------
    def _take(self, n: int) -> list[int]:
        if n > len(self.free_list):
            raise PoolExhausted(f"pages: {n} needed, {len(self.free_list)} free of {self.num_pages}")
        pages = [self.free_list.pop() for _ in range(n)]
        for p in pages:
            self.ref[p] = 1
        return pages

    def add_sequence(self, seq, n_tokens: int, shared_prefix: list[int] | None = None) -> list[int]:
        """A new sequence of ``n_tokens``; ``shared_prefix`` pages (e.g. a radix hit) are reused."""
        if seq in self.tables:
            raise bad_value("seq", seq, "a sequence id not already in the pool")
        if n_tokens < 0:
            raise bad_value("n_tokens", n_tokens, "a number of tokens >= 0")
        prefix = list(shared_prefix or [])
        if len(prefix) * self.page_size > n_tokens:
            raise bad_value("shared_prefix", len(prefix), f"at most {n_tokens // self.page_size} "
                            "full pages of the sequence")
        for p in prefix:
            self._check_live(p)
        need = -(-n_tokens // self.page_size) - len(prefix)
        pages = self._take(need)
        for p in prefix:
            self.ref[p] += 1
        self.tables[seq] = prefix + pages
        self.tokens[seq] = n_tokens
        return list(self.tables[seq])

    def check_writable(self, seq) -> None:
        """Raise unless the next token of ``seq`` can be written in place (its last page is private)."""
        n = self.tokens[seq]
        if n % self.page_size == 0:
            return  # the next token opens a new page
        page = self.tables[seq][-1]
        if self.ref[page] != 1 or page in self.immutable:
            raise KvsqueezeError(f"seq {seq!r}: its last page {page} is shared; a partial page "
                                 "must never be fused or shared")

    def append_tokens(self, seq, n: int = 1) -> list[int]:
        """Grow ``seq`` by ``n`` tokens; returns the new pages (empty when the last page had room)."""
        if seq not in self.tables:
            raise bad_value("seq", seq, "a sequence in the pool")
        self.check_writable(seq)
        total = self.tokens[seq] + n
        need = -(-total // self.page_size) - len(self.tables[seq])
        pages = self._take(max(0, need))
        self.tables[seq].extend(pages)
        self.tokens[seq] = total
        return pages

    def release(self, seq) -> int:
        """Finish or abort ``seq``: drop its references; returns the pages that became free."""
        table = self.tables.pop(seq, None)
        if table is None:
            raise bad_value("seq", seq, "a sequence in the pool")
        self.tokens.pop(seq)
        return sum(self._unref(p) for p in table)

    def retain(self, page: int) -> None:
        """Another holder's reference (a radix node, a transfer); only full pages are shared."""
        self._check_live(page)
        for seq, table in self.tables.items():
            if self.tokens[seq] % self.page_size and table[-1] == page:
                raise bad_value("page", page, f"a full page (it is the partial last page of {seq!r})")
        self.ref[page] += 1
        self.extra_refs[page] += 1

    def release_page(self, page: int) -> int:
        if not 0 <= page < self.num_pages or self.extra_refs[page] < 1:
            raise bad_value("page", page, "a page retained with retain()")
        self.extra_refs[page] -= 1
        return self._unref(page)

    def _unref(self, page: int) -> int:
        self.ref[page] -= 1
        if self.ref[page] == 0:
            self.immutable.discard(page)
            self.free_list.append(page)
            return 1
        return 0

    def _check_live(self, page: int) -> None:
        if not 0 <= page < self.num_pages or self.ref[page] < 1:
            raise bad_value("page", page, "a page in use")

    # ---- fusion ----------------------------------------------------------------------------
    def full_blocks(self, seq) -> int:
        return self.tokens[seq] // self.page_size

    def fuse(self, groups: list[list[tuple[object, int]]]) -> list[Remap]:
        """Point every member ``(seq, block)`` of a group at the group's first member's page.

        The kept page becomes immutable (its content is the fused block, written by the caller
        before or right after this call); the members' old pages lose a reference and are freed when
        no one else holds them. Every member must be a full block; a group of one changes nothing.
        """
        for grp in groups:
            for seq, block in grp:
                if seq not in self.tables:
                    raise bad_value("seq", seq, "a sequence in the pool")
                if not 0 <= block < self.full_blocks(seq):
                    raise bad_value("block", block, f"a full block of {seq!r} "
                                    f"(0..{self.full_blocks(seq) - 1}); partial blocks never fuse")
        remaps = []
        for grp in groups:
            if len(grp) < 2:
                continue
            seq0, b0 = grp[0]
            keep = self.tables[seq0][b0]
            for seq, block in grp[1:]:
                old = self.tables[seq][block]
                if old == keep:
                    continue
                self.tables[seq][block] = keep
                self.ref[keep] += 1
                self.fused_away += self._unref(old)
                remaps.append(Remap(seq, block, old, keep))
            self.immutable.add(keep)
        return remaps

    # ---- invariants ------------------------------------------------------------------------
    def check(self) -> None:
        """Raise AssertionError if any page is leaked, double-free or miscounted."""
        counts = [0] * self.num_pages
        for seq, table in self.tables.items():
            assert len(table) == -(-self.tokens[seq] // self.page_size), seq
            for p in table:
                counts[p] += 1
        free = set(self.free_list)
        assert len(free) == len(self.free_list), "a page is in the free list twice"
        for p in range(self.num_pages):
            expected = counts[p] + self.extra_refs[p]
            assert self.ref[p] == expected, (p, self.ref[p], expected)
            assert (p in free) == (expected == 0), (p, expected)
            assert not (p in free and p in self.immutable), p
        for seq, table in self.tables.items():
            if self.tokens[seq] % self.page_size:
                last = table[-1]
                assert self.ref[last] == 1 and last not in self.immutable, (seq, last)
