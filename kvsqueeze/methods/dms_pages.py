"""Per-head paged KV pages for DMS: the engine-agnostic bookkeeping of a pool where eviction frees memory.

Each (sequence, layer, KV head) owns its own list of pages; a page holds ``page_size`` token slots of
one layer and one KV head, and every page comes from, and returns to, one shared free list that any
request can use. The rules are those of the DMS reference cache (``dms_cache.py``):

- prefill keeps, per (layer, head), the tokens not flagged for eviction plus the last ``window + 1``
  positions; only those take slots (pages are allocated for survivors only);
- decode token t: if the token leaving the window (position ``t - window - 1``) is flagged, t takes its
  slot in place; otherwise t takes a new slot (and a new page when the head's pages are full);
- finish or abort returns every page of the sequence.

So a head holds exactly the positions ``{p <= t : not flagged(p) or p >= t - window}`` after token t,
and uses ``ceil(held / page_size)`` pages. An engine adapter keeps its page tables in step with this
pool (slot id = ``page * page_size + offset``) and gives the attention kernel per-(sequence, head)
page tables and lengths (``kvsqueeze/kernels/paged_decode.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvsqueeze.errors import KvsqueezeError, bad_value


class PagesExhausted(KvsqueezeError):
    """Not enough free pages for the operation; nothing was changed."""


@dataclass
class _Head:
    pages: list[int] = field(default_factory=list)
    slot_pos: list[int] = field(default_factory=list)  # position held by slot i (slot order)
    ring: dict[int, int] = field(default_factory=dict)  # position -> slot, positions in the window


@dataclass
class _Seq:
    heads: list[list[_Head]]
    seen: int = 0  # tokens processed (positions 0..seen-1)
    peak_tokens: int = 0
    reads: int = 0  # KV token reads of decode steps, summed over layers and heads


class HeadPagePool:
    def __init__(self, num_pages: int, page_size: int, n_layers: int, kv_heads: int, window: int):
        for name, v, lo in (("num_pages", num_pages, 1), ("page_size", page_size, 1),
                            ("n_layers", n_layers, 1), ("kv_heads", kv_heads, 1),
                            ("window", window, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise bad_value(name, v, f"a whole number >= {lo}")
        self.num_pages, self.page_size = num_pages, page_size
        self.n_layers, self.kv_heads, self.window = n_layers, kv_heads, window
        self.free_list = list(range(num_pages - 1, -1, -1))
        self.owner: dict[int, tuple] = {}
        self.seqs: dict[object, _Seq] = {}

    @property
    def free_pages(self) -> int:
        return len(self.free_list)

    # ---- helpers -------------------------------------------------------------------------------
    def _take(self, n: int, who) -> list[int]:
        pages = [self.free_list.pop() for _ in range(n)]
        for p in pages:
            self.owner[p] = who
        return pages

    def _slot_id(self, head: _Head, slot: int) -> int:
        return head.pages[slot // self.page_size] * self.page_size + slot % self.page_size

    def _check_flags(self, flags: torch.Tensor, n: int, what: str) -> torch.Tensor:
        flags = torch.as_tensor(flags, dtype=torch.bool)
        if tuple(flags.shape) != (self.n_layers, self.kv_heads, n):
            raise bad_value(what, tuple(flags.shape),
                            f"[layers={self.n_layers}, kv_heads={self.kv_heads}, tokens={n}]")
        return flags

    # ---- prefill -------------------------------------------------------------------------------
    def pages_for_prefill(self, flags: torch.Tensor) -> int:
        n = flags.shape[-1]
        keep = (~flags) | (torch.arange(n) >= n - 1 - self.window)
        held = keep.sum(-1)
        return int(((held + self.page_size - 1) // self.page_size).sum())

    def admit(self, seq, flags: torch.Tensor) -> list[list[torch.Tensor]]:
        """Prefill ``seq`` (``flags``: ``[layers, kv_heads, n]``, True = evict). Returns per layer and
        head the slot ids of the kept positions (in position order); raises PagesExhausted, with
        nothing allocated, when the pool cannot hold them."""
        if seq in self.seqs:
            raise bad_value("seq", seq, "a sequence not already in the pool")
        n = int(torch.as_tensor(flags).shape[-1])
        flags = self._check_flags(flags, n, "flags")
        need = self.pages_for_prefill(flags)
        if need > self.free_pages:
            raise PagesExhausted(f"pages: prefill of {n} tokens needs {need}, {self.free_pages} free")
        keep = (~flags) | (torch.arange(n) >= n - 1 - self.window)
        state = _Seq([[_Head() for _ in range(self.kv_heads)] for _ in range(self.n_layers)], seen=n)
        out = []
        for layer in range(self.n_layers):
            row = []
            for h in range(self.kv_heads):
                head = state.heads[layer][h]
                pos = keep[layer, h].nonzero()[:, 0].tolist()
                head.pages = self._take(-(-len(pos) // self.page_size), (seq, layer, h))
                head.slot_pos = list(pos)
                head.ring = {p: i for i, p in enumerate(pos) if p >= n - 1 - self.window}
                row.append(torch.tensor([self._slot_id(head, i) for i in range(len(pos))],
                                        dtype=torch.long))
            out.append(row)
        self.seqs[seq] = state
        state.peak_tokens = self.tokens_held(seq)
        return out

    # ---- decode --------------------------------------------------------------------------------
    def append(self, seq, leaving_flags: torch.Tensor | None) -> torch.Tensor:
        """Place the next token of ``seq``. ``leaving_flags``: ``[layers, kv_heads]`` eviction flags of
        the token leaving the window (position ``seen - window - 1``), None while there is none.
        Returns ``[layers, kv_heads]`` slot ids; raises PagesExhausted (nothing changed) when a new page
        is needed and none is free. Counts the step's KV token reads (the held tokens it attends)."""
        if seq not in self.seqs:
            raise bad_value("seq", seq, "a sequence in the pool")
        s = self.seqs[seq]
        t = s.seen
        leaving = t - self.window - 1
        if leaving >= 0:
            if leaving_flags is None:
                raise bad_value("leaving_flags", None, f"the flags of position {leaving}")
            lf = torch.as_tensor(leaving_flags, dtype=torch.bool)
            if tuple(lf.shape) != (self.n_layers, self.kv_heads):
                raise bad_value("leaving_flags", tuple(lf.shape),
                                f"[layers={self.n_layers}, kv_heads={self.kv_heads}]")
        plan = []
        new_pages = 0
        for layer in range(self.n_layers):
            for h in range(self.kv_heads):
                head = s.heads[layer][h]
                reuse = head.ring.get(leaving) if leaving >= 0 and bool(lf[layer, h]) else None
                if reuse is None and len(head.slot_pos) % self.page_size == 0:
                    new_pages += 1
                plan.append((layer, h, reuse))
        if new_pages > self.free_pages:
            raise PagesExhausted(f"pages: decode step needs {new_pages}, {self.free_pages} free")
        out = torch.empty(self.n_layers, self.kv_heads, dtype=torch.long)
        for layer, h, reuse in plan:
            head = s.heads[layer][h]
            head.ring.pop(leaving, None)
            if reuse is None:
                if len(head.slot_pos) % self.page_size == 0:
                    head.pages += self._take(1, (seq, layer, h))
                slot = len(head.slot_pos)
                head.slot_pos.append(t)
            else:
                slot = reuse
                head.slot_pos[slot] = t
            head.ring[t] = slot
            out[layer, h] = self._slot_id(head, slot)
        s.seen = t + 1
        held = self.tokens_held(seq)
        s.reads += held
        s.peak_tokens = max(s.peak_tokens, held)
        return out

    # ---- finish --------------------------------------------------------------------------------
    def release(self, seq) -> int:
        """Finish or abort: every page of ``seq`` back to the free list; returns how many."""
        s = self.seqs.pop(seq, None)
        if s is None:
            raise bad_value("seq", seq, "a sequence in the pool")
        n = 0
        for row in s.heads:
            for head in row:
                for p in head.pages:
                    del self.owner[p]
                    self.free_list.append(p)
                    n += 1
        return n

    # ---- figures and invariants ----------------------------------------------------------------
    def held_positions(self, seq, layer: int, head: int) -> set[int]:
        return set(self.seqs[seq].heads[layer][head].slot_pos)

    def tokens_held(self, seq) -> int:
        return sum(len(h.slot_pos) for row in self.seqs[seq].heads for h in row)

    def page_table(self, seq, layer: int, head: int) -> list[int]:
        return list(self.seqs[seq].heads[layer][head].pages)

    def check(self) -> None:
        free = set(self.free_list)
        assert len(free) == len(self.free_list), "a page is free twice"
        assert not (free & set(self.owner)), "a page is free and owned"
        assert len(free) + len(self.owner) == self.num_pages, "a page is leaked"
        for seq, s in self.seqs.items():
            for layer, row in enumerate(s.heads):
                for h, head in enumerate(row):
                    assert len(head.pages) == -(-len(head.slot_pos) // self.page_size), (seq, layer, h)
                    for p in head.pages:
                        assert self.owner.get(p) == (seq, layer, h), (p, self.owner.get(p))
                    assert len(set(head.slot_pos)) == len(head.slot_pos)
                    for pos, slot in head.ring.items():
                        assert head.slot_pos[slot] == pos
