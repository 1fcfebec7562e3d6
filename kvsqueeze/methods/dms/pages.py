"""Per-head KV slots for DMS, shared between requests: the engine-agnostic bookkeeping of a pool where
eviction frees memory and a cached prefix is held once.

Every stored K/V vector is a *slot* of one (layer, KV head), taken from one free list. A slot belongs to
the engine token index that produced it (``token -> slot`` per layer and head) and is referenced by

- every running sequence (engine request *row*) whose head holds that token: the row's *view*, the list
  of slots its attention reads (keys carry RoPE already, so their order does not matter), and
- the engine's prefix cache, once it has *published* the token (``publish``; ``forget`` when the engine
  frees the token index, e.g. a radix node evicted). When the cache already holds a request's prefix
  under other token indices, the request's stored slots that the cache's tokens lack move over to them
  before its duplicates are freed (``adopt``): which tokens of a shared prefix are held depends on the
  token after it, so two continuations of one prefix may hold different ones.

A slot is freed when its last reference goes. The rules are those of :mod:`kvsqueeze.methods.dms.rule`,
as the reference cache (:mod:`kvsqueeze.methods.dms.cache`) applies them:

- an extend (a prefill, a prefill chunk, or the rest of a prompt after a cache hit) of positions
  ``m..n-1`` attends to the view (what is held at ``m``) and to itself under the DMS rule; afterwards
  the view holds exactly what is held at ``n``: the prefix's flagged tokens that left the window leave
  the view, and only the new tokens that are unflagged or in the window take slots;
- decode token ``t`` takes a new slot per (layer, head); if the token leaving the window (position
  ``t - window - 1``) is flagged, it leaves the view (its slot is freed unless another view or the cache
  still references it);
- one step of lag: a flagged token that has just left the window keeps its slot one step longer (not
  attended: at most one slot per head), so that a sequence stored at ``n`` tokens can be resumed at
  ``n - 1``, where engines' prefix caches match (they compute at least one token of a prompt).

A new token always takes a fresh slot, so nothing shared is ever written. Decisions are causal: which
tokens of a prefix are held depends only on the prefix, except the last position, whose flag the next
token decides. So a sequence can resume from any cached prefix whose held tokens are all still stored
(``resumable``): its view is rebuilt from the token tables (``begin`` with a prefix), and the flags of
the prefix's window come from the decisions stored per token (the decision token ``p`` made about
``p - 1``).

An engine adapter gives the attention kernel per-(sequence, head) slot tables and lengths
(``tables``; ``kvsqueeze/kernels/paged_decode.py`` with pages of one slot). A decode step splits in
three: before the forward the pool places the batch's tokens (``append``, ``tables``: host work);
each layer's forward (:func:`decode_layer`) only writes and reads device tensors, so a CUDA graph can
capture it; after the forward the pool takes in the gates' decisions (``decode_flags``), reading the
step's logits back once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.kernels.paged_decode import paged_decode
from kvsqueeze.methods.dms import rule


class SlotsExhausted(KvsqueezeError):
    """Not enough free slots for the operation; nothing was changed. ``short``: how many more free
    slots it needs."""

    def __init__(self, message: str, short: int):
        super().__init__(message)
        self.short = short


@dataclass
class _Row:
    view: torch.Tensor  # [layers, heads, cap] slot ids (entries past the head's length unused)
    pos: torch.Tensor  # [layers, heads, cap] positions held by those slots
    length: torch.Tensor  # [layers, heads]
    windex: torch.Tensor  # [layers, heads, window + 2] view entry of window position p at p % (window + 2)
    lag: torch.Tensor  # [layers, heads] slot of position seen - window - 2 if flagged and stored, else -1
    seen: int = 0  # tokens processed, including an extend in progress
    start: int = 0  # first position of the extend in progress
    prompt: int = 0  # tokens before the first decode step
    shared: int = 0  # (layer, head) slots taken from the cache when the row began from a cached prefix
    base: int = 0  # positions of that cached prefix (0: none)
    shared_left: int = 0  # of the shared slots, those that have left the view (still stored: the cache
    # holds them while the row runs on its prefix)
    peak: int = 0
    reads: int = 0  # KV token reads of decode steps, summed over layers and heads
    steps: int = 0
    placed: int = 0  # layers of the extend in progress already placed


class HeadSlotPool:
    """See the module docstring. ``num_slots`` (layer, head) slots; ``num_tokens`` engine token indices
    (``0..num_tokens-1``); ``rows`` engine request rows (``0..rows-1``)."""

    def __init__(self, num_slots: int, n_layers: int, kv_heads: int, window: int, sinks: int,
                 num_tokens: int, rows: int):
        for name, v, lo in (("num_slots", num_slots, 1), ("n_layers", n_layers, 1), ("kv_heads", kv_heads, 1),
                            ("window", window, 0), ("sinks", sinks, 0), ("num_tokens", num_tokens, 1),
                            ("rows", rows, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise bad_value(name, v, f"a whole number >= {lo}")
        self.num_slots, self.n_layers, self.kv_heads = num_slots, n_layers, kv_heads
        self.window, self.sinks, self.size = window, sinks, window + 2
        self.lh = n_layers * kv_heads
        self.free_stack = torch.arange(num_slots - 1, -1, -1, dtype=torch.long)
        self.n_free = num_slots
        self.view_refs = torch.zeros(num_slots, dtype=torch.int32)
        self.cached = torch.zeros(num_slots, dtype=torch.bool)  # the prefix cache references it
        self.slot_token = torch.full((num_slots,), -1, dtype=torch.long)
        self.slot_lh = torch.zeros(num_slots, dtype=torch.long)  # layer * kv_heads + head
        self.token_slot = torch.full((num_tokens, self.lh), -1, dtype=torch.long)
        self.token_flag = torch.zeros(num_tokens, self.lh, dtype=torch.bool)  # its decision about p - 1
        self.token_cached = torch.zeros(num_tokens, dtype=torch.bool)
        self.flags = WindowFlags(rows, n_layers, kv_heads, window, sinks)
        self.rows: dict[int, _Row] = {}
        # positions that left a window, per (row, layer, head), and how many of them were flagged
        self.left = 0
        self.left_evicted = 0

    # ---- figures ---------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self.n_free

    def kept_fraction(self) -> float | None:
        """Measured share of positions kept after leaving the window (None before any left it)."""
        return None if self.left == 0 else 1.0 - self.left_evicted / self.left

    def cache_only_slots(self) -> int:
        """Slots only the prefix cache references (what evicting all of it could free)."""
        return int((self.cached & (self.view_refs == 0)).sum())

    def held(self, row: int) -> int:
        """Slots the row's attention reads (its view)."""
        return int(self.rows[row].length.sum())

    def footprint(self, row: int, held: int | None = None) -> int:
        """Slots stored for the row: its view (``held``, when the caller has counted it), and the
        slots it took from the cached prefix that have left its view since (the cache keeps them
        while the row runs on that prefix). The row's ``peak`` is the largest footprint; less its
        ``shared`` slots, what it holds on its own."""
        return (self.held(row) if held is None else held) + self.rows[row].shared_left

    def seen(self, row: int) -> int:
        return self.rows[row].seen

    def stats(self, row: int) -> dict:
        r = self.rows[row]
        return {"seen": r.seen, "prompt": r.prompt, "held": self.held(row), "peak": r.peak, "reads": r.reads,
                "steps": r.steps, "shared": r.shared, "slots_per_token": self.lh}

    def held_positions(self, row: int, layer: int, head: int) -> set[int]:
        r = self.rows[row]
        return set(r.pos[layer, head, :int(r.length[layer, head])].tolist())

    def view_slots(self, row: int, layer: int, head: int) -> list[int]:
        r = self.rows[row]
        return r.view[layer, head, :int(r.length[layer, head])].tolist()

    # ---- slots -----------------------------------------------------------------------------
    def _alloc(self, lh: torch.Tensor) -> torch.Tensor:
        n = lh.numel()
        if n > self.n_free:
            raise SlotsExhausted(f"slots: {n} needed, {self.n_free} free", n - self.n_free)
        ids = self.free_stack[self.n_free - n:self.n_free].clone()
        self.n_free -= n
        self.slot_lh[ids] = lh
        self.slot_token[ids] = -1
        self.view_refs[ids] = 1
        return ids

    def _free(self, dead: torch.Tensor) -> None:
        if not dead.numel():
            return
        tok = self.slot_token[dead]
        mapped = tok >= 0
        self.token_slot[tok[mapped], self.slot_lh[dead[mapped]]] = -1
        self.slot_token[dead] = -1
        self.free_stack[self.n_free:self.n_free + dead.numel()] = dead
        self.n_free += dead.numel()

    def _unref(self, slots: torch.Tensor) -> None:
        """Drop one view reference from each of ``slots`` (repeats allowed: one per view)."""
        if not slots.numel():
            return
        self.view_refs.index_add_(0, slots, torch.full_like(slots, -1, dtype=torch.int32))
        cand = slots.unique()
        self._free(cand[(self.view_refs[cand] == 0) & ~self.cached[cand]])

    # ---- the prefix cache ------------------------------------------------------------------
    def publish(self, tokens: torch.Tensor) -> None:
        """The engine's prefix cache now holds ``tokens``: it references their stored slots."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()
        new = tokens[~self.token_cached[tokens]].unique()
        self.token_cached[new] = True
        s = self.token_slot[new].reshape(-1)
        self.cached[s[s >= 0]] = True

    def adopt(self, kept: torch.Tensor, duplicates: torch.Tensor) -> int:
        """The engine's prefix cache keeps ``kept`` (its token indices of a prefix) and is about to free
        ``duplicates``, the same tokens at the same positions computed again by a request (their K/V
        are the same). Which tokens of a shared prefix a sequence holds depends on the token after it:
        the prefix's last token may be flagged (and not stored) in the continuation that put it in the
        cache, but held in this one. Where a kept token has no slot for a (layer, head) and its
        duplicate has one, the slot moves to the kept token, so that this continuation stays resumable
        once its duplicates are freed. Returns the slots moved."""
        kept = torch.as_tensor(kept, dtype=torch.long).reshape(-1).cpu()
        dup = torch.as_tensor(duplicates, dtype=torch.long).reshape(-1).cpu()
        if kept.numel() != dup.numel():
            raise bad_value("duplicates", dup.numel(), f"one duplicate per kept token ({kept.numel()})")
        differ = kept != dup  # a request that resumed from the cache holds the cache's own indices
        kept, dup = kept[differ], dup[differ]
        move = (self.token_slot[kept] < 0) & (self.token_slot[dup] >= 0)
        if not bool(move.any()):
            return 0
        i, lh = move.nonzero(as_tuple=True)
        slots = self.token_slot[dup[i], lh]
        self.token_slot[dup[i], lh] = -1
        self.token_slot[kept[i], lh] = slots
        self.slot_token[slots] = kept[i]
        self.cached[slots] = self.token_cached[kept[i]]
        return int(slots.numel())

    def forget(self, tokens: torch.Tensor) -> None:
        """The engine freed the token indices ``tokens`` (a cache entry evicted, a duplicate, a
        finished request's uncached tail): the cache's references go, and the indices are free for
        new tokens; slots still in a view stay until the view lets them go."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()
        if not tokens.numel():
            return
        s = self.token_slot[tokens].reshape(-1)
        s = s[s >= 0]
        self.cached[s] = False
        self.slot_token[s] = -1
        self.token_slot[tokens] = -1
        self.token_flag[tokens] = False
        self.token_cached[tokens] = False
        self._free(s[self.view_refs[s] == 0])

    def _prefix_state(self, tokens: torch.Tensor):
        """Slots ``[m, layers*heads]`` of a prefix's tokens and the flags ``[m, layers*heads]`` its own
        tokens decided (position ``m - 1`` undecided)."""
        m = tokens.numel()
        slots = self.token_slot[tokens]
        flags = torch.zeros(m, self.lh, dtype=torch.bool)
        if m > 1:
            flags[:-1] = self.token_flag[tokens[1:]]
        return slots, flags

    def resumable(self, tokens: torch.Tensor) -> int:
        """The longest ``m' <= len(tokens)`` such that every token the prefix ``tokens[:m']`` holds
        (unflagged, or in the window at ``m'``) is still stored: where a sequence can resume."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()
        m = tokens.numel()
        if m == 0:
            return 0
        slots, flags = self._prefix_state(tokens)
        missing = slots < 0
        any_missing = missing.any(1).long()  # needed in the window
        unflagged_missing = (missing & ~flags).any(1).long()  # needed before it
        ca = torch.cat([torch.zeros(1, dtype=torch.long), any_missing.cumsum(0)])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), unflagged_missing.cumsum(0)])
        cand = torch.arange(1, m + 1)  # m'
        lo = (cand - 1 - self.window).clamp(min=0)  # first window position at m'
        ok = (ca[cand] - ca[lo] == 0) & (cu[lo] == 0)
        # flags of positions before the window at m' are decided inside the prefix (p + 1 < m')
        good = cand[ok]
        return int(good.max()) if good.numel() else 0

    # ---- rows: an extend -------------------------------------------------------------------
    def _new_row(self, cap: int) -> _Row:
        cap = max(cap, 16)
        return _Row(view=torch.zeros(self.n_layers, self.kv_heads, cap, dtype=torch.long),
                    pos=torch.zeros(self.n_layers, self.kv_heads, cap, dtype=torch.long),
                    length=torch.zeros(self.n_layers, self.kv_heads, dtype=torch.long),
                    windex=torch.zeros(self.n_layers, self.kv_heads, self.size, dtype=torch.long),
                    lag=torch.full((self.n_layers, self.kv_heads), -1, dtype=torch.long))

    def _grow(self, r: _Row, need: int) -> None:
        cap = r.view.shape[-1]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        pad = (0, new - cap)
        r.view = torch.nn.functional.pad(r.view, pad)
        r.pos = torch.nn.functional.pad(r.pos, pad)

    def begin(self, row: int, prefix_tokens: torch.Tensor, n: int) -> int:
        """Start an extend of ``row`` to ``n`` tokens from the prefix ``prefix_tokens`` (the engine's
        token indices of positions ``0..m-1``; ``m`` may be 0). A row already at ``m`` continues (a
        prefill chunk); a new row with ``m > 0`` resumes from the cached prefix (its held slots are
        referenced, nothing is copied). Returns the slots taken from the cache."""
        prefix_tokens = torch.as_tensor(prefix_tokens, dtype=torch.long).reshape(-1).cpu()
        m = prefix_tokens.numel()
        if isinstance(n, bool) or not isinstance(n, int) or n <= m:
            raise bad_value("n", n, f"a whole number of tokens > the prefix's {m}")
        r = self.rows.get(row)
        if r is not None:
            if r.seen != m or r.placed not in (0, self.n_layers):
                raise bad_value("prefix", m, f"the {r.seen} tokens row {row} already holds (a continuation)")
            r.start, r.seen, r.placed = m, n, 0
            if r.steps == 0:
                r.prompt = n
            return 0
        r = self._new_row(n + self.size)
        self.flags.ring[row] = False
        shared = 0
        if m:
            slots, flags = self._prefix_state(prefix_tokens)
            keep = rule.held(flags.T.reshape(self.n_layers, self.kv_heads, m), self.window)  # [L, H, m]
            sl = slots.T.reshape(self.n_layers, self.kv_heads, m)
            if bool((sl[keep] < 0).any()):
                raise bad_value("prefix", m, "a prefix whose held tokens are all stored (check with resumable())")
            length = keep.sum(-1)
            self._grow(r, int(length.max()) + n - m + self.size)
            order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # held positions first
            width = int(length.max())
            idx = order[..., :width]
            valid = torch.arange(width)[None, None, :] < length[..., None]
            r.view[..., :width] = torch.where(valid, sl.gather(-1, idx), 0)
            r.pos[..., :width] = torch.where(valid, idx, 0)
            r.length = length
            rank = keep.long().cumsum(-1) - 1  # view entry of each held position
            lo = max(0, m - 1 - self.window)
            p = torch.arange(lo, m)
            r.windex[..., p % self.size] = rank[..., lo:m]
            self.flags.set(row, p, flags[lo:m].T.reshape(self.n_layers, self.kv_heads, m - lo))
            held_slots = r.view[..., :width][valid]
            self.view_refs.index_add_(0, held_slots, torch.ones_like(held_slots, dtype=torch.int32))
            shared = int(held_slots.numel())
        r.seen, r.start, r.prompt, r.shared, r.base, r.placed = n, m, n, shared, m, 0
        self.rows[row] = r
        return shared

    def chunk_flags(self, row: int, logits: torch.Tensor) -> torch.Tensor:
        """Flags ``[heads, e + 1]`` of positions ``m-1..n-1`` of the extend in progress from its tokens'
        gate logits ``[e, heads]`` (column 0: position ``m - 1``, False when ``m == 0``; the last
        position undecided)."""
        r = self.rows[row]
        e = r.seen - r.start
        if logits.shape[0] != e:
            raise bad_value("logits", tuple(logits.shape), f"[{e} tokens, kv_heads]")
        first, f = rule.decide_chunk(logits.T.cpu(), r.start, self.sinks)
        hk = f.shape[0]
        lead = torch.zeros(hk, 1 if r.start == 0 else 0, dtype=torch.bool)
        return torch.cat([lead, f, torch.zeros(hk, 1, dtype=torch.bool)], 1)

    def _prefix_flags(self, row: int, layer: int, cf: torch.Tensor):
        """The extend's view at ``layer`` before it is placed: ``lo`` (the window's start at ``m``), the
        flags ``pf [heads, n - lo]`` of positions ``lo..n-1`` (the ring's, then the extend's ``cf``), and
        per view entry its position, whether it is used, and its flag."""
        r = self.rows[row]
        m, w = r.start, self.window
        lo = max(0, m - 1 - w)
        before = torch.arange(lo, max(m - 1, lo))
        pf = torch.cat([self.flags.ring[row, layer][:, before % self.size], cf if m else cf[:, 1:]], 1)
        ln = r.length[layer]
        width = int(ln.max()) if ln.numel() else 0
        kpos = r.pos[layer, :, :width]
        valid = torch.arange(width)[None, :] < ln[:, None]
        kflag = torch.where(kpos >= lo, pf.gather(-1, (kpos - lo).clamp(min=0)), False) & valid
        return lo, pf, kpos, valid, kflag

    def extend_attention(self, row: int, layer: int, cf: torch.Tensor):
        """What the extend's queries attend at ``layer``: the view's slots ``[heads, P]`` (padding 0)
        and the mask ``[heads, e, P + e]`` over (those slots, then the extend's own tokens)."""
        r = self.rows[row]
        m, n, w = r.start, r.seen, self.window
        _, _, kpos, valid, kflag = self._prefix_flags(row, layer, cf)
        slots = r.view[layer, :, :kpos.shape[-1]]
        qpos = torch.arange(m, n)[None, :, None]
        pre = valid[:, None, :] & ~(kflag[:, None, :] & rule.outside_window(qpos, kpos[:, None, :], w))
        own = rule.visible(cf[:, 1:], 0, n - m, w)  # positions m..n-1 among themselves
        # rule.visible measures distances from position 0 of its flags; shifting both by m keeps them
        return torch.where(valid, slots, 0), torch.cat([pre, own], -1)

    def extend_place(self, row: int, layer: int, cf: torch.Tensor, tokens: torch.Tensor):
        """After ``layer``'s attention: the view becomes what is held at ``n``; the extend's tokens
        (engine indices ``tokens [e]``) that are held take new slots. Returns per head ``(offsets,
        slots)``: which of the extend's tokens to store, and where."""
        r = self.rows[row]
        m, n, w, hk = r.start, r.seen, self.window, self.kv_heads
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()
        if tokens.numel() != n - m or r.placed != layer:
            raise bad_value("extend", (layer, tokens.numel()), f"layer {r.placed} of {n - m} tokens")
        lhs = torch.arange(layer * hk, (layer + 1) * hk)
        lo, pf, kpos, valid, kflag = self._prefix_flags(row, layer, cf)
        width = kpos.shape[-1]
        # the prefix's entries that leave: flagged, and out of the window at n
        stay = valid & ~(kflag & ~rule.in_window(kpos, n, w))
        # the lag: position n - w - 2 stays stored (not attended) one more step if flagged, so that a
        # prefix cache can resume this sequence at n - 1 (engines match at most all but one token)
        lagp = n - w - 2
        to_lag = valid & ~stay & (kpos == lagp)
        gone = r.view[layer, :, :width][valid & ~stay & ~to_lag]
        shared_left = int((valid & ~stay & (kpos < r.base)).sum())
        old_lag = r.lag[layer][r.lag[layer] >= 0]
        own_keep = rule.held(torch.cat([torch.zeros(hk, m, dtype=torch.bool), cf[:, 1:]], 1), w)[:, m:]
        own_lag = torch.zeros(hk, dtype=torch.bool) if lagp < m else pf[:, lagp - lo]
        drop = torch.cat([gone, old_lag])
        freed = int(((self.view_refs[drop] == 1) & ~self.cached[drop]).sum())
        need = int(own_keep.sum()) + int(own_lag.sum())
        if need > self.n_free + freed:
            raise SlotsExhausted(f"slots: an extend of {n - m} tokens (layer {layer}) needs "
                                 f"{need}, {self.n_free + freed} free", need - self.n_free - freed)
        # nothing has changed so far; from here on the layer is placed
        self.token_flag[tokens[:, None], lhs[None, :]] = cf[:, :-1].T  # token m+i decided m+i-1
        new_lag = torch.full((hk,), -1, dtype=torch.long)
        hh, jj = to_lag.nonzero(as_tuple=True)
        new_lag[hh] = r.view[layer, :, :width][hh, jj]
        self._unref(drop)
        hi = max(0, n - 1 - w)  # positions lo..hi-1 left the window during this extend
        if hi > lo:
            self.left += (hi - lo) * hk
            self.left_evicted += int(pf[:, :hi - lo].sum())
        self.flags.set(row, torch.arange(lo, n), pf[None], layer=layer)
        out = []
        new_len = stay.sum(-1) + own_keep.sum(-1)
        self._grow(r, int(new_len.max()))
        offs = [own_keep[h].nonzero()[:, 0] for h in range(hk)]
        lag_off = lagp - m
        stored = [torch.cat([o, torch.tensor([lag_off])]) if own_lag[h] else o for h, o in enumerate(offs)]
        new_slots = self._alloc(torch.cat([torch.full((o.numel(),), layer * hk + h, dtype=torch.long)
                                           for h, o in enumerate(stored)]))
        s0 = 0
        for h in range(hk):
            keep_v = r.view[layer, h, :width][stay[h]]
            keep_p = r.pos[layer, h, :width][stay[h]]
            o = stored[h]
            sl = new_slots[s0:s0 + o.numel()]
            s0 += o.numel()
            self.slot_token[sl] = tokens[o]
            self.token_slot[tokens[o], layer * hk + h] = sl
            if own_lag[h]:
                new_lag[h] = sl[-1]
                o, sl = o[:-1], sl[:-1]
            k = keep_v.numel()
            r.view[layer, h, :k + o.numel()] = torch.cat([keep_v, sl])
            r.pos[layer, h, :k + o.numel()] = torch.cat([keep_p, o + m])
            r.length[layer, h] = k + o.numel()
            out.append((stored[h], new_slots[s0 - stored[h].numel():s0]))
        r.lag[layer] = new_lag
        # view entries of the positions in the window at n
        lo = max(0, n - 1 - w)
        p = torch.arange(lo, n)
        for h in range(hk):
            pos = r.pos[layer, h, :int(r.length[layer, h])]
            where = torch.full((n,), -1, dtype=torch.long)
            where[pos] = torch.arange(pos.numel())
            r.windex[layer, h, p % self.size] = where[lo:n]
        r.shared_left += shared_left
        r.placed = layer + 1
        if r.placed == self.n_layers:
            r.peak = max(r.peak, self.footprint(row))
        return out

    # ---- rows: decode ----------------------------------------------------------------------
    def _leaving(self, row: int):
        r = self.rows[row]
        lf = self.flags.leaving(row, r.seen)
        return (None, None) if lf is None else (lf, r.windex[:, :, rule.leaving(r.seen, self.window) % self.size])

    def slots_for_append(self, row: int) -> int:
        """Exactly how many free slots :meth:`append` of ``row``'s next token needs (the slots its
        leaving tokens free count as free)."""
        r = self.rows[row]
        s = r.lag[r.lag >= 0]  # the lag goes; the leaving tokens become the lag
        return self.lh - int(((self.view_refs[s] == 1) & ~self.cached[s]).sum())

    def append(self, row: int, token: int) -> torch.Tensor:
        """Place ``row``'s next token (engine index ``token``): a new slot per (layer, head), returned
        ``[layers, heads]``; the flagged token leaving the window leaves the view. Raises
        SlotsExhausted (nothing changed) when the free slots do not suffice."""
        r = self.rows.get(row)
        if r is None or r.placed != self.n_layers:
            raise bad_value("row", row, "a row whose extend is placed")
        need = self.slots_for_append(row)
        if need > self.n_free:
            raise SlotsExhausted(f"slots: decode step needs {need}, {self.n_free} free", need - self.n_free)
        t = r.seen
        lf, vi = self._leaving(row)
        L, H = self.n_layers, self.kv_heads
        if lf is None:
            lf = torch.zeros(L, H, dtype=torch.bool)
            vi = torch.zeros(L, H, dtype=torch.long)
        else:
            lf = lf.clone()
            self.left += L * H
            self.left_evicted += int(lf.sum())
        leaving = r.view.gather(-1, vi[..., None])[..., 0]
        r.shared_left += int((lf & (r.pos.gather(-1, vi[..., None])[..., 0] < r.base)).sum())
        self._unref(r.lag[r.lag >= 0])  # first, so that their slots serve this step
        r.lag = torch.where(lf, leaving, -1)
        self._grow(r, int(r.length.max()) + 1)
        new = self._alloc(torch.arange(L * H)).reshape(L, H)
        target = torch.where(lf, vi, r.length)
        r.view.scatter_(-1, target[..., None], new[..., None])
        r.pos.scatter_(-1, target[..., None], torch.full((L, H, 1), t, dtype=torch.long))
        r.length += (~lf).long()
        r.windex[..., t % self.size] = target
        self.slot_token[new.reshape(-1)] = int(token)
        self.token_slot[int(token)] = new.reshape(-1)
        self.token_flag[int(token)] = False
        r.seen = t + 1
        r.steps += 1
        held = self.held(row)
        r.reads += held
        r.peak = max(r.peak, self.footprint(row, held))
        return new

    def decode_flags(self, rows: torch.Tensor, layer: int, positions: torch.Tensor, logits: torch.Tensor,
                     tokens: torch.Tensor) -> None:
        """A decode step at ``layer``: the gate logits ``[batch, heads]`` of the tokens (engine indices
        ``tokens``) at ``positions`` decide the positions before them."""
        d = self.flags.decode(rows, layer, positions, logits)
        hk = self.kv_heads
        self.token_flag[tokens.long().cpu(), layer * hk:(layer + 1) * hk] = d

    def release(self, row: int) -> dict:
        """Finish, abort or retract: the row's view lets its slots go; returns its figures."""
        if row not in self.rows:
            raise bad_value("row", row, "a row in the pool")
        st = self.stats(row)
        r = self.rows.pop(row)
        valid = torch.arange(r.view.shape[-1])[None, None, :] < r.length[..., None]
        self._unref(torch.cat([r.view[valid], r.lag[r.lag >= 0]]))
        return st

    def tables(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot tables ``[layers, len(rows), heads, width]`` and lengths ``[layers, len(rows), heads]``:
        the paged-decode kernel's page tables with pages of one slot."""
        rs = [self.rows[q] for q in rows]
        width = max((int(r.length.max()) for r in rs), default=0)
        pt = torch.zeros(self.n_layers, len(rs), self.kv_heads, width, dtype=torch.long)
        ln = torch.zeros(self.n_layers, len(rs), self.kv_heads, dtype=torch.long)
        for i, r in enumerate(rs):
            w = min(width, r.view.shape[-1])
            pt[:, i, :, :w] = r.view[..., :w]
            ln[:, i] = r.length
        return pt, ln

    # ---- invariants ------------------------------------------------------------------------
    def check(self) -> None:
        free = self.free_stack[:self.n_free]
        assert free.unique().numel() == self.n_free, "a slot is free twice"
        refs = torch.zeros(self.num_slots, dtype=torch.int32)
        for r in self.rows.values():
            valid = torch.arange(r.view.shape[-1])[None, None, :] < r.length[..., None]
            s = r.view[valid]
            lh = torch.arange(self.lh).reshape(self.n_layers, self.kv_heads, 1).expand_as(valid)[valid]
            assert bool((self.slot_lh[s] == lh).all()), "a view holds another head's slot"
            lag = r.lag.reshape(-1)
            assert bool((self.slot_lh[lag[lag >= 0]] == torch.arange(self.lh)[lag >= 0]).all())
            assert not bool(torch.isin(lag[lag >= 0], s).any()), "a lagging slot is still attended"
            s = torch.cat([s, lag[lag >= 0]])
            refs.index_add_(0, s, torch.ones_like(s, dtype=torch.int32))
            for layer in range(self.n_layers):
                for h in range(self.kv_heads):
                    k = int(r.length[layer, h])
                    assert r.view[layer, h, :k].unique().numel() == k, "a view holds a slot twice"
        assert bool((refs == self.view_refs).all()), "view reference counts are wrong"
        live = (self.view_refs > 0) | self.cached
        is_free = torch.zeros(self.num_slots, dtype=torch.bool)
        is_free[free] = True
        assert not bool((is_free & live).any()), "a referenced slot is free"
        assert bool((is_free | live).all()), "a slot is leaked"
        mapped = self.slot_token >= 0
        s = mapped.nonzero()[:, 0]
        assert bool((self.token_slot[self.slot_token[s], self.slot_lh[s]] == s).all()), "token tables disagree"
        assert bool((self.cached[s] == self.token_cached[self.slot_token[s]]).all()), "cache references disagree"
        assert not bool((self.cached & ~mapped).any()), "the cache references a slot of no token"
        t, lh = (self.token_slot >= 0).nonzero(as_tuple=True)
        assert bool((self.slot_token[self.token_slot[t, lh]] == t).all()), "token tables disagree"


class WindowFlags:
    """Eviction flags of the positions each row still has in its window, per (layer, KV head), in a
    ring of ``window + 2`` positions (``t - window - 1 .. t`` while token ``t`` is placed)."""

    def __init__(self, rows: int, n_layers: int, kv_heads: int, window: int, sinks: int):
        self.window, self.sinks, self.size = window, sinks, window + 2
        self.ring = torch.zeros(rows, n_layers, kv_heads, self.size, dtype=torch.bool)

    def set(self, row: int, positions: torch.Tensor, flags: torch.Tensor, layer: int | None = None) -> None:
        """Flags ``[layers, kv_heads, len(positions)]`` (or ``[1, kv_heads, ...]`` of one ``layer``)."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        keep = positions >= positions.max() + 1 - self.size if positions.numel() else positions.bool()
        p, f = positions[keep], flags[..., keep].cpu()
        if layer is None:
            self.ring[row][..., p % self.size] = f
        else:
            self.ring[row, layer][:, p % self.size] = f[0]

    def decode(self, rows: torch.Tensor, layer: int, positions: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """A decode step: the gate logits ``[batch, kv_heads]`` of the tokens at ``positions``
        (``[batch]``) of request ``rows`` decide the positions before them; the new tokens are
        undecided. Returns the decisions ``[batch, kv_heads]``."""
        rows, t = rows.long().cpu(), positions.long().cpu()
        d = rule.decide_step(logits.cpu(), t, self.sinks)
        self.ring[rows, layer, :, (t - 1) % self.size] = d
        self.ring[rows, layer, :, t % self.size] = False
        return d

    def leaving(self, row: int, seen: int) -> torch.Tensor | None:
        """``[layers, kv_heads]`` flags of the position that leaves the window as token ``seen`` is
        placed, or None while there is none."""
        pos = rule.leaving(seen, self.window)
        return None if pos < 0 else self.ring[row, :, :, pos % self.size]


def decode_layer(q, k, v, logits, slots, tables, lengths, k_store, v_store, logit_store, scale=None):
    """One layer of a DMS decode step, on the device and free of host reads, Python side effects and
    data-dependent shapes (what a CUDA graph captures): the batch's new keys and values ``k``, ``v``
    ``[batch * kv_heads, dim]`` go to their slots ``slots [batch * kv_heads]`` of ``k_store`` /
    ``v_store`` ``[num_slots, 1, dim]``, the gate logits ``[batch, kv_heads]`` to ``logit_store``
    (read by :meth:`HeadSlotPool.decode_flags` after the step), and the queries ``q [batch, q_heads,
    dim]`` attend to their heads' held slots (``tables``, ``lengths``: :meth:`HeadSlotPool.tables`)."""
    # in place on a flat view: written as ``k_store[slots, 0] = k``, a compiled graph (torch.compile,
    # SGLang's CPU graphs) copies the whole store per layer instead of writing the rows
    k_store.view(-1, k_store.shape[-1]).index_put_((slots,), k.to(k_store.dtype))
    v_store.view(-1, v_store.shape[-1]).index_put_((slots,), v.to(v_store.dtype))
    logit_store.copy_(logits)
    return paged_decode(q, k_store, v_store, tables, lengths, scale)
