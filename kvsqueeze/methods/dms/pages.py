"""Per-head paged KV pages for DMS: the engine-agnostic bookkeeping of a pool where eviction frees memory.

Each (sequence, layer, KV head) owns its own list of pages; a page holds ``page_size`` token slots of
one layer and one KV head, and every page comes from, and returns to, one shared free list that any
request can use. The rules are those of :mod:`kvsqueeze.methods.dms.rule`, as the reference cache
(:mod:`kvsqueeze.methods.dms.cache`) applies them:

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
from kvsqueeze.methods.dms import rule


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
    prompt: int = 0  # tokens of the prefill
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
        # eviction statistics: (sequence, layer, head) positions that left the window, and how many of
        # them were flagged (evicted); their ratio estimates how fast a sequence's holdings grow
        self.left = 0
        self.left_evicted = 0

    def kept_fraction(self) -> float | None:
        """Measured share of positions kept after leaving the window (None before any left it)."""
        return None if self.left == 0 else 1.0 - self.left_evicted / self.left

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
        held = self.prefill_keep(torch.as_tensor(flags, dtype=torch.bool)).sum(-1)
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
        self.begin(seq, n)
        return [self.admit_layer(seq, layer, flags[layer]) for layer in range(self.n_layers)]

    def begin(self, seq, n: int) -> None:
        """Start the prefill of ``seq`` (``n`` prompt tokens), to be placed layer by layer with
        :meth:`admit_layer`, as an engine computes the flags one layer at a time."""
        if seq in self.seqs:
            raise bad_value("seq", seq, "a sequence not already in the pool")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise bad_value("n", n, "a whole number of prompt tokens >= 1")
        self.seqs[seq] = _Seq([[_Head() for _ in range(self.kv_heads)] for _ in range(self.n_layers)],
                              seen=n, prompt=n)

    def prefill_keep(self, flags: torch.Tensor) -> torch.Tensor:
        """The positions a prefill of ``flags.shape[-1]`` tokens keeps: unflagged or in the window."""
        return rule.held(flags, self.window)

    def admit_layer(self, seq, layer: int, flags: torch.Tensor) -> list[torch.Tensor]:
        """Place one layer of ``seq``'s prefill (``flags``: ``[kv_heads, n]``); returns per head the
        slot ids of the kept positions. Raises PagesExhausted, with nothing allocated for this layer,
        when the pool cannot hold them (the engine's admission must make room beforehand)."""
        s = self.seqs.get(seq)
        if s is None:
            raise bad_value("seq", seq, "a sequence started with begin()")
        n = s.seen
        flags = torch.as_tensor(flags, dtype=torch.bool).cpu()
        if tuple(flags.shape) != (self.kv_heads, n):
            raise bad_value("flags", tuple(flags.shape), f"[kv_heads={self.kv_heads}, tokens={n}]")
        if any(s.heads[layer][h].slot_pos for h in range(self.kv_heads)):
            raise bad_value("layer", layer, f"a layer of {seq!r} not yet placed")
        need = self.pages_for_prefill(flags)
        if need > self.free_pages:
            raise PagesExhausted(f"pages: prefill of {n} tokens (layer {layer}) needs {need}, "
                                 f"{self.free_pages} free")
        left = max(0, n - 1 - self.window)  # positions that already left the window
        self.left += left * self.kv_heads
        self.left_evicted += int(flags[:, :left].sum())
        keep = self.prefill_keep(flags)
        row = []
        for h in range(self.kv_heads):
            head = s.heads[layer][h]
            pos = keep[h].nonzero()[:, 0].tolist()
            head.pages = self._take(-(-len(pos) // self.page_size), (seq, layer, h))
            head.slot_pos = list(pos)
            head.ring = {p: i for i, p in enumerate(pos) if rule.in_window(p, n, self.window)}
            row.append(torch.tensor([self._slot_id(head, i) for i in range(len(pos))], dtype=torch.long))
        s.peak_tokens = max(s.peak_tokens, self.tokens_held(seq))
        return row

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
        leaving = rule.leaving(t, self.window)
        if leaving >= 0:
            if leaving_flags is None:
                raise bad_value("leaving_flags", None, f"the flags of position {leaving}")
            lf = torch.as_tensor(leaving_flags, dtype=torch.bool)
            if tuple(lf.shape) != (self.n_layers, self.kv_heads):
                raise bad_value("leaving_flags", tuple(lf.shape),
                                f"[layers={self.n_layers}, kv_heads={self.kv_heads}]")
        plan, new_pages = self._plan(s, leaving, lf if leaving >= 0 else None)
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
        if leaving >= 0:
            self.left += self.n_layers * self.kv_heads
            self.left_evicted += int(lf.sum())
        held = self.tokens_held(seq)
        s.reads += held
        s.peak_tokens = max(s.peak_tokens, held)
        return out

    def _plan(self, s: _Seq, leaving: int, lf: torch.Tensor | None):
        plan = []
        new_pages = 0
        lfl = lf.tolist() if lf is not None else None
        for layer in range(self.n_layers):
            for h in range(self.kv_heads):
                head = s.heads[layer][h]
                reuse = head.ring.get(leaving) if lfl is not None and lfl[layer][h] else None
                if reuse is None and len(head.slot_pos) % self.page_size == 0:
                    new_pages += 1
                plan.append((layer, h, reuse))
        return plan, new_pages

    def pages_for_append(self, seq, leaving_flags: torch.Tensor | None) -> int:
        """Exactly how many new pages :meth:`append` of ``seq``'s next token would take."""
        s = self.seqs[seq]
        leaving = rule.leaving(s.seen, self.window)
        lf = None if leaving < 0 else torch.as_tensor(leaving_flags, dtype=torch.bool)
        return self._plan(s, leaving, lf)[1]

    def seen(self, seq) -> int:
        return self.seqs[seq].seen

    def stats(self, seq) -> dict:
        """Figures of one sequence: tokens seen, (layer, head) token slots held now and at peak, and
        KV token reads of its decode steps (summed over layers and heads)."""
        s = self.seqs[seq]
        return {"seen": s.seen, "prompt": s.prompt, "held": self.tokens_held(seq), "peak": s.peak_tokens,
                "reads": s.reads, "steps": s.seen - s.prompt,
                "slots_per_token": self.n_layers * self.kv_heads}

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

    def page_tables(self, seqs: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Page tables ``[layers, len(seqs), kv_heads, max pages]`` and lengths ``[layers, len(seqs),
        kv_heads]`` of ``seqs``, the inputs of the paged-decode kernel (unused entries are page 0)."""
        heads = [self.seqs[q].heads for q in seqs]
        width = max((len(h.pages) for hs in heads for row in hs for h in row), default=0)
        pt = [[[h.pages + [0] * (width - len(h.pages)) for h in hs[layer]] for hs in heads]
              for layer in range(self.n_layers)]
        ln = [[[len(h.slot_pos) for h in hs[layer]] for hs in heads] for layer in range(self.n_layers)]
        return (torch.tensor(pt, dtype=torch.long).reshape(self.n_layers, len(seqs), self.kv_heads, width),
                torch.tensor(ln, dtype=torch.long).reshape(self.n_layers, len(seqs), self.kv_heads))

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


class WindowFlags:
    """Eviction flags of the positions each sequence still has in its window, per (layer, KV head):
    what :meth:`HeadPagePool.append` needs when those positions leave it. An engine computes the flags
    layer by layer inside its forward pass; this keeps them, per engine request row, in a ring of
    ``window + 2`` positions (``t - window - 1 .. t`` while token ``t`` is placed)."""

    def __init__(self, rows: int, n_layers: int, kv_heads: int, window: int, sinks: int):
        self.window, self.sinks, self.size = window, sinks, window + 2
        self.ring = torch.zeros(rows, n_layers, kv_heads, self.size, dtype=torch.bool)

    def prefill(self, row: int, layer: int, flags: torch.Tensor) -> None:
        """The flags ``[kv_heads, n]`` of a prefill of ``n`` tokens (the last ones are kept)."""
        n = flags.shape[-1]
        lo = max(0, n - self.size)
        self.ring[row, layer, :, torch.arange(lo, n) % self.size] = flags[:, lo:].cpu()

    def decode(self, rows: torch.Tensor, layer: int, positions: torch.Tensor, logits: torch.Tensor) -> None:
        """A decode step: the gate logits ``[batch, kv_heads]`` of the tokens at ``positions``
        (``[batch]``) of request ``rows`` decide the positions before them; the new tokens are undecided."""
        rows, t = rows.long().cpu(), positions.long().cpu()
        self.ring[rows, layer, :, (t - 1) % self.size] = rule.decide_step(logits.cpu(), t, self.sinks)
        self.ring[rows, layer, :, t % self.size] = False

    def leaving(self, row: int, seen: int) -> torch.Tensor | None:
        """``[layers, kv_heads]`` flags of the position that leaves the window as token ``seen`` is
        placed, or None while there is none."""
        pos = rule.leaving(seen, self.window)
        return None if pos < 0 else self.ring[row, :, :, pos % self.size]

    def reset(self) -> None:
        self.ring.zero_()
