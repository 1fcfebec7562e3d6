"""DMS per-head paged pool and paged-decode attention: invariants, the eviction rule, the kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.kernels.paged_decode import (paged_decode_reference, paged_decode_torch,
                                            paged_decode_triton)
from kvsqueeze.methods.dms import rule as dms_rule
from kvsqueeze.methods.dms.pages import HeadSlotPool, SlotsExhausted, decode_layer

ROOT = Path(__file__).resolve().parents[1]
L, H, W, SINKS = 2, 2, 3, 1
TOKENS = 48  # engine token indices


def flag_of(content: tuple, layer: int, head: int) -> bool:
    """A deterministic gate: the decision token ``len(content) - 1`` makes about the one before it
    (causal: a function of the content up to that token), True (evict) about 60% of the time."""
    p = len(content) - 2
    if p < SINKS:
        return False
    return hash((content, layer, head)) % 5 < 3


def value_of(content: tuple, layer: int, head: int) -> float:
    """What a token's K/V 'is' (a function of the content up to it), to catch a slot holding another."""
    return float(hash((content, layer, head, "kv")) % 100_003)


class SharedSlotsMachine(RuleBasedStateMachine):
    """An engine around the pool: requests start from the longest cached prefix, extend in chunks,
    decode, publish into a prefix tree (duplicates freed, as SGLang's radix cache does), finish or
    abort, and the tree evicts unlocked leaves. After every step each running row holds exactly the
    rule's positions, every slot it reads holds that position's K/V, and nothing leaks."""

    def __init__(self):
        super().__init__()
        self.pool = HeadSlotPool(num_slots=70, n_layers=L, kv_heads=H, window=W, sinks=SINKS,
                                 num_tokens=TOKENS, rows=4)
        self.free_tokens = list(range(TOKENS))
        self.tree: dict[tuple, int] = {}  # content prefix -> token index of its last position
        self.rows: dict[int, dict] = {}  # row -> {"content": [...], "tokens": [...]}
        self.value: dict[int, float] = {}  # slot -> K/V written there

    # ---- engine helpers ------------------------------------------------------------------
    def _logits(self, content, positions):
        return torch.tensor([[1.0 if flag_of(tuple(content[:q + 1]), layer, h) else -1.0 for h in range(H)]
                             for q in positions for layer in [self._layer]])

    def _extend(self, row, prefix_tokens, content, m, n, tokens):
        shared_before = self.pool.free_slots
        self.pool.begin(row, torch.tensor(prefix_tokens, dtype=torch.long), n)
        assert self.pool.free_slots == shared_before  # a resume references, it copies nothing
        for layer in range(L):
            self._layer = layer
            cf = self.pool.chunk_flags(row, self._logits(content, range(m, n)))
            slots, mask = self.pool.extend_attention(row, layer, cf)
            for h in range(H):  # the mask lets query i see exactly the rule's keys at position i
                kpos = sorted(self.pool.held_positions(row, layer, h))
                order = self.pool.rows[row].pos[layer, h, :len(kpos)].tolist()
                for i in range(m, n):
                    seen = {order[j] for j in range(len(order)) if mask[h, i - m, j]}
                    seen |= {m + j for j in range(n - m) if mask[h, i - m, slots.shape[1] + j]}
                    exp = {p for p in range(i + 1) if p >= i - W or not (
                        p <= i - 1 and flag_of(tuple(content[:p + 2]), layer, h))}
                    assert seen == exp, (i, seen, exp)
            placed = self.pool.extend_place(row, layer, cf, torch.tensor(tokens, dtype=torch.long))
            for h, (offs, sl) in enumerate(placed):
                for o, s in zip(offs.tolist(), sl.tolist()):
                    self.value[s] = value_of(tuple(content[:m + o + 1]), layer, h)

    def _take_tokens(self, k):
        if len(self.free_tokens) < k:
            return None
        out, self.free_tokens = self.free_tokens[:k], self.free_tokens[k:]
        return out

    def _locked(self) -> set[int]:
        return {t for r in self.rows.values() for t in r["tokens"]}

    # ---- rules ---------------------------------------------------------------------------
    @precondition(lambda self: len(self.rows) < 4)
    @rule(data=st.data(), n=st.integers(1, 9))
    def start(self, data, n):
        row = min(set(range(4)) - set(self.rows))
        paths = sorted(k for k in self.tree)
        base = list(data.draw(st.sampled_from(paths))) if paths and data.draw(st.booleans()) else []
        content = (base + data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))[:max(n, 1)]
        content = content if len(content) >= 1 else [0]
        n = len(content)
        hit = []
        for p in range(1, n):  # the longest cached prefix, at most n - 1 tokens (one is computed)
            if tuple(content[:p]) in self.tree:
                hit.append(self.tree[tuple(content[:p])])
            else:
                break
        m = self.pool.resumable(torch.tensor(hit, dtype=torch.long))
        tokens = self._take_tokens(n - m)
        if tokens is None:
            return
        try:
            self._extend(row, hit[:m], content, m, n, tokens)
        except SlotsExhausted:
            self.pool.release(row) if row in self.pool.rows else None
            self.free_tokens += tokens
            self.pool.forget(torch.tensor(tokens, dtype=torch.long))
            return
        self.rows[row] = {"content": content, "tokens": hit[:m] + tokens, "decoded": 0}

    @precondition(lambda self: any(r["decoded"] == 0 for r in self.rows.values()))
    @rule(data=st.data(), k=st.integers(1, 4))
    def chunk(self, data, k):
        row = data.draw(st.sampled_from(sorted(q for q, r in self.rows.items() if r["decoded"] == 0)))
        r = self.rows[row]
        tokens = self._take_tokens(k)
        if tokens is None:
            return
        content = r["content"] + data.draw(st.lists(st.integers(0, 2), min_size=k, max_size=k))
        m = len(r["content"])
        try:
            self._extend(row, r["tokens"], content, m, m + k, tokens)
        except SlotsExhausted:  # the engine aborts a request whose chunk does not fit
            self.pool.forget(torch.tensor(tokens, dtype=torch.long))
            self.free_tokens += tokens
            self._end(row, publish=False)
            return
        r["content"], r["tokens"] = content, r["tokens"] + tokens

    @precondition(lambda self: self.rows)
    @rule(data=st.data(), nxt=st.integers(0, 2))
    def decode(self, data, nxt):
        row = data.draw(st.sampled_from(sorted(self.rows)))
        r = self.rows[row]
        tokens = self._take_tokens(1)
        if tokens is None:
            return
        free = self.pool.free_slots
        need = self.pool.slots_for_append(row)
        try:
            new = self.pool.append(row, tokens[0])
        except SlotsExhausted:
            assert need > free and self.pool.free_slots == free
            self.free_tokens += tokens
            return
        assert free - self.pool.free_slots == need  # the engine's capacity check is exact
        content = r["content"] + [nxt]
        t = len(content) - 1
        for layer in range(L):
            for h in range(H):
                self.value[int(new[layer, h])] = value_of(tuple(content), layer, h)
            self._layer = layer
            self.pool.decode_flags(torch.tensor([row]), layer, torch.tensor([t]),
                                   self._logits(content, [t]), torch.tensor(tokens))
        r["content"], r["tokens"], r["decoded"] = content, r["tokens"] + tokens, r["decoded"] + 1

    def _publish(self, row):
        r = self.rows[row]
        for p in range(len(r["content"])):
            key = tuple(r["content"][:p + 1])
            own = r["tokens"][p]
            if key in self.tree:
                if self.tree[key] != own:  # a duplicate: the engine frees it, the row uses the tree's
                    self.pool.adopt(torch.tensor([self.tree[key]]), torch.tensor([own]))
                    self.pool.forget(torch.tensor([own]))
                    self.free_tokens.append(own)
                    r["tokens"][p] = self.tree[key]
            else:
                self.tree[key] = own
                self.pool.publish(torch.tensor([own]))

    def _end(self, row, publish):
        if publish:
            self._publish(row)
        r = self.rows.pop(row)
        cached = set(self.tree.values())
        private = [t for t in r["tokens"] if t not in cached]
        self.pool.forget(torch.tensor(private, dtype=torch.long))
        self.free_tokens += private
        self.pool.release(row)

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def publish(self, data):
        self._publish(data.draw(st.sampled_from(sorted(self.rows))))

    @precondition(lambda self: self.rows)
    @rule(data=st.data(), publish=st.booleans())
    def finish_or_abort(self, data, publish):
        self._end(data.draw(st.sampled_from(sorted(self.rows))), publish)

    @precondition(lambda self: self.tree)
    @rule(data=st.data())
    def evict_a_leaf(self, data):
        locked = self._locked()
        leaves = [k for k in self.tree if not any(len(j) == len(k) + 1 and j[:-1] == k for j in self.tree)
                  and self.tree[k] not in locked]
        if not leaves:
            return
        k = data.draw(st.sampled_from(sorted(leaves)))
        t = self.tree.pop(k)
        self.pool.forget(torch.tensor([t]))
        self.free_tokens.append(t)

    @invariant()
    def rows_hold_the_rule_and_read_their_own_kv(self):
        self.pool.check()
        for row, r in self.rows.items():
            c = r["content"]
            n = len(c)
            for layer in range(L):
                for h in range(H):
                    exp = {p for p in range(n) if p >= n - 1 - W or not (
                        p <= n - 2 and flag_of(tuple(c[:p + 2]), layer, h))}
                    assert self.pool.held_positions(row, layer, h) == exp
                    rr = self.pool.rows[row]
                    k = int(rr.length[layer, h])
                    for s, p in zip(rr.view[layer, h, :k].tolist(), rr.pos[layer, h, :k].tolist()):
                        assert self.value[s] == value_of(tuple(c[:p + 1]), layer, h), (row, layer, h, p)
        if not self.rows:  # idle: only the tree holds slots, and evicting all of it frees everything
            assert self.pool.free_slots + self.pool.cache_only_slots() == self.pool.num_slots


TestSharedSlots = SharedSlotsMachine.TestCase
TestSharedSlots.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


def _prefill(pool, row, flags, tokens):
    """Place a prefill of ``flags [layers, heads, n]`` (True = evict; the rule's shifted decisions)."""
    n = flags.shape[-1]
    pool.begin(row, torch.zeros(0, dtype=torch.long), n)
    out = []
    for layer in range(pool.n_layers):
        cf = torch.cat([torch.zeros(pool.kv_heads, 1, dtype=torch.bool), flags[layer]], 1)
        out.append(pool.extend_place(row, layer, cf, tokens))
    return out


def test_eviction_frees_room_for_more_sequences_than_a_dense_pool():
    n, slots = 64, 2 * L * H * 64
    flags = torch.ones(L, H, n, dtype=torch.bool)
    flags[:, :, ::4] = False  # keep one token in four (4x), plus the window
    flags[:, :, -1] = False
    pool = HeadSlotPool(slots, L, H, W, 0, num_tokens=64 * 20, rows=20)
    admitted = 0
    while True:
        try:
            _prefill(pool, admitted, flags, torch.arange(admitted * n, (admitted + 1) * n))
            admitted += 1
        except SlotsExhausted:
            break
    per_seq = int(dms_rule.held(flags, W).sum())
    assert admitted == slots // per_seq >= 6  # a dense pool holds 2
    pool.release(admitted)
    for r in range(admitted):
        pool.release(r)
    pool.check()
    assert pool.free_slots == slots


def test_threads_of_one_prompt_hold_it_once():
    """A prompt prefilled and published (as SGLang does before the n threads of one question), then
    four rows resume at all but its last token (where a prefix cache matches): they reference the
    prompt's slots instead of storing it again, and each holds exactly the rule's positions."""
    n, w = 40, W
    flags = torch.zeros(L, H, n, dtype=torch.bool)
    flags[:, :, 1:-1] = torch.rand(L, H, n - 2, generator=torch.Generator().manual_seed(3)) < 0.7
    pool = HeadSlotPool(2000, L, H, w, 0, num_tokens=500, rows=5)
    _prefill(pool, 0, flags, torch.arange(n))
    stored = pool.num_slots - pool.free_slots
    assert stored == int(dms_rule.held(flags, w).sum()) + int(flags[..., n - w - 2].sum())  # + the lag
    pool.publish(torch.arange(n))
    pool.release(0)
    assert pool.free_slots == pool.num_slots - stored  # the cache keeps them
    assert pool.resumable(torch.arange(n - 1)) == n - 1
    for row in range(1, 5):
        shared = pool.begin(row, torch.arange(n - 1), n)
        prefix_flags = flags[..., :n - 1].clone()
        prefix_flags[..., -1] = False
        assert shared == int(dms_rule.held(prefix_flags, w).sum())
        before = pool.free_slots
        for layer in range(L):
            cf = torch.cat([flags[layer][:, n - 2:n - 1], torch.zeros(H, 1, dtype=torch.bool)], 1)
            pool.extend_place(row, layer, cf, torch.tensor([100 * row]))
        # the thread stores its own last token only (plus, per head, the lag of a flagged token)
        assert before - pool.free_slots <= L * H
        for layer in range(L):
            for h in range(H):
                assert pool.held_positions(row, layer, h) == set(
                    dms_rule.held(flags[layer, h], w).nonzero()[:, 0].tolist())
    pool.check()
    assert pool.num_slots - pool.free_slots <= stored + 4 * L * H


def test_a_thread_peak_counts_the_prompt_slots_that_left_its_view():
    """Four threads resume from a cached prompt and decode past the window with gates that evict:
    the prompt's flagged tokens leave each thread's view but stay stored (the cache keeps them while
    the threads run on it). The peak per question the harness computes from the threads' figures
    (the shared slots once plus each thread's peak less its shared part) must follow the pool's own
    count of stored slots: at most it, and below it only by the cache's slots the threads do not
    share (the prompt's last token, the lag) and one lag slot per head and thread."""
    n, w, k, threads = 40, W, W + 6, 4
    flags = torch.ones(L, H, n, dtype=torch.bool)
    flags[:, :, -1] = False
    pool = HeadSlotPool(4000, L, H, w, 0, num_tokens=1000, rows=threads + 1)
    _prefill(pool, 0, flags, torch.arange(n))
    pool.publish(torch.arange(n))
    pool.release(0)
    cache = pool.num_slots - pool.free_slots
    rows = list(range(1, threads + 1))
    for row in rows:
        pool.begin(row, torch.arange(n - 1), n)
        for layer in range(L):
            cf = torch.cat([flags[layer][:, n - 2:n - 1], torch.zeros(H, 1, dtype=torch.bool)], 1)
            pool.extend_place(row, layer, cf, torch.tensor([100 * row]))
    used = pool.num_slots - pool.free_slots
    for step in range(k):
        for row in rows:
            tok = 100 * row + 1 + step
            pool.append(row, tok)
            for layer in range(L):
                pool.decode_flags(torch.tensor([row]), layer, torch.tensor([n + step]), torch.full((1, H), 5.0),
                                  torch.tensor([tok]))
        used = max(used, pool.num_slots - pool.free_slots)
    figs = [pool.stats(r) for r in rows]
    shared = max(f["shared"] for f in figs)
    question = shared + sum(f["peak"] - f["shared"] for f in figs)
    assert used - (cache - shared) - threads * L * H <= question <= used
    for r in rows:
        pool.release(r)
    pool.check()
    assert pool.num_slots - pool.free_slots == cache


@pytest.mark.parametrize("adopt", [True, False])
def test_a_prompt_sharing_a_cached_prefix_stays_resumable_once_its_duplicates_are_freed(adopt):
    """Prompts A and B share their first k tokens (a common template). The decision about the last
    shared token is made by the token after it, which differs: A evicts it (it left A's window, never
    stored), B keeps it. Both are prefilled, A enters the cache first, then B, whose duplicate indices
    of the shared prefix the cache frees (SGLang keeps its own). With ``adopt`` (what the SGLang radix
    cache calls first), B's held slot moves to the cache's token and B's whole prompt stays resumable:
    its threads resume at n - 1 and hold exactly B's rule positions. Without it B is cut back to the
    sinks (every thread of B would prefill the prompt again: what a server showed with two prompts of
    one template prefilled together)."""
    n, k, w = 30, 8, W
    g = torch.Generator().manual_seed(7)
    fa = torch.rand(L, H, n, generator=g) < 0.6
    fa[..., :SINKS], fa[..., -1] = False, False
    fb = fa.clone()
    fb[..., k:-1] = torch.rand(L, H, n - k - 1, generator=g) < 0.6  # B's own tokens decide differently
    fa[..., k - 1], fb[..., k - 1] = True, False  # decided by token k, which differs
    pool = HeadSlotPool(2000, L, H, w, SINKS, num_tokens=200, rows=6)
    a_tok, b_tok = torch.arange(n), torch.arange(100, 100 + n)
    _prefill(pool, 0, fa, a_tok)
    _prefill(pool, 1, fb, b_tok)
    assert bool((pool.token_slot[a_tok[k - 1]] < 0).all())  # A never stored it
    pool.publish(a_tok)
    path = torch.cat([a_tok[:k], b_tok[k:]])  # B in the cache: A's indices for the shared prefix
    moved = pool.adopt(a_tok[:k], b_tok[:k]) if adopt else 0
    pool.forget(b_tok[:k])
    pool.publish(b_tok[k:])
    pool.release(0)
    pool.release(1)
    pool.check()
    if not adopt:  # the window at any later point needs tokens only B stored: cut back to the sinks
        assert pool.resumable(path[:n - 1]) == SINKS
        return
    assert moved == L * H  # B's slot of the last shared token, per (layer, head); the rest A had
    assert pool.resumable(path[:n - 1]) == n - 1
    for row in (2, 3):  # two threads of B
        pool.begin(row, path[:n - 1], n)
        for layer in range(L):
            cf = torch.cat([fb[layer][:, n - 2:n - 1], torch.zeros(H, 1, dtype=torch.bool)], 1)
            pool.extend_place(row, layer, cf, torch.tensor([150 + row]))
            for h in range(H):
                assert pool.held_positions(row, layer, h) == set(dms_rule.held(fb[layer, h], w).nonzero()[:, 0].tolist())
    assert pool.resumable(a_tok[:n - 1]) == n - 1  # A's own continuation is untouched
    pool.check()
    for row in (2, 3):
        pool.release(row)
    pool.forget(torch.tensor([152, 153]))
    pool.forget(torch.cat([a_tok, b_tok[k:]]))  # the cache evicts everything: nothing leaks
    pool.check()
    assert pool.free_slots == pool.num_slots
    with pytest.raises(KvsqueezeError, match="one duplicate per kept token"):
        pool.adopt(a_tok[:3], b_tok[:2])


def test_bad_pool_input():
    with pytest.raises(KvsqueezeError, match="window=-1"):
        HeadSlotPool(8, 1, 1, -1, 0, 8, 1)
    pool = HeadSlotPool(8, 1, 1, 2, 0, 8, 1)
    with pytest.raises(KvsqueezeError, match="n=2"):
        pool.begin(0, torch.tensor([0, 1]), 2)
    pool.begin(0, torch.zeros(0, dtype=torch.long), 3)
    with pytest.raises(KvsqueezeError, match="logits"):
        pool.chunk_flags(0, torch.zeros(2, 1))
    with pytest.raises(KvsqueezeError, match="row=0"):
        pool.append(0, 5)  # its extend is not placed yet


# ---- paged decode attention ----------------------------------------------------------------------
def test_pool_plus_paged_decode_equals_attention_over_the_held_tokens():
    torch.manual_seed(0)
    d, n, hq, steps = 8, 20, 4, 6
    pool = HeadSlotPool(64, 1, H, W, 0, num_tokens=64, rows=1)
    flags = torch.rand(1, H, n + steps) < 0.5  # flags[p]: decided by token p + 1
    flags[..., -1] = False
    k_all, v_all = torch.randn(H, n + steps, d), torch.randn(H, n + steps, d)
    k_slots, v_slots = torch.zeros(64, 1, d), torch.zeros(64, 1, d)
    prefill_flags = flags[:, :, :n].clone()
    prefill_flags[..., -1] = False  # the prompt's last token is undecided
    for h, (offs, sl) in enumerate(_prefill(pool, 0, prefill_flags, torch.arange(n))[0]):
        k_slots[sl, 0], v_slots[sl, 0] = k_all[h, offs], v_all[h, offs]
    for t in range(n, n + steps):
        new = pool.append(0, t)
        k_slots[new[0], 0], v_slots[new[0], 0] = k_all[:, t], v_all[:, t]
        logits = torch.where(flags[0, :, t - 1], 1.0, -1.0)[None]  # token t decides t - 1
        pool.decode_flags(torch.tensor([0]), 0, torch.tensor([t]), logits, torch.tensor([t]))
    q = torch.randn(1, hq, d)
    pt, ln = pool.tables([0])  # the tables an engine hands the kernel (pages of one slot)
    out = paged_decode_reference(q, k_slots, v_slots, pt[0], ln[0])
    assert torch.allclose(paged_decode_torch(q, k_slots, v_slots, pt[0], ln[0]), out, atol=1e-5)
    t = n + steps - 1
    for qh in range(hq):
        h = qh // (hq // H)
        held = sorted(pool.held_positions(0, 0, h))
        assert held == [p for p in range(t + 1) if not flags[0, h, p] or p >= t - W]
        p = torch.softmax(q[0, qh] @ k_all[h, held].T * d ** -0.5, -1)
        assert torch.allclose(out[0, qh], p @ v_all[h, held], atol=1e-5)


def test_a_decode_layer_traces_as_one_graph_and_equals_the_eager_step():
    """What a CUDA graph captures of a DMS decode step: each layer writes the new K/V into their
    slots, keeps the gate logits in a device buffer and attends to the held slots. Traced by
    torch.compile with ``fullgraph=True`` (any host read, Python side effect or data-dependent shape
    would break the graph and fail here), two steps of new data through one compiled graph give the
    eager step's stores and logits and the reference attention over the held slots."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    bs, hk, hq, d, width, num = 3, 2, 4, 8, 7, 64
    stores = [torch.randn(num, 1, d, generator=g) for _ in range(2)]
    step = torch.compile(decode_layer, fullgraph=True, dynamic=False, backend="eager")
    for _ in range(2):  # same shapes, new data: no new graph
        q = torch.randn(bs, hq, d, generator=g)
        k, v = torch.randn(bs * hk, d, generator=g), torch.randn(bs * hk, d, generator=g)
        logits = torch.randn(bs, hk, generator=g)
        slots = torch.randperm(num, generator=g)[:bs * hk]
        lengths = torch.randint(1, width + 1, (bs, hk), generator=g)
        tables = torch.randint(0, num, (bs, hk, width), generator=g)
        tables[..., 0] = slots.reshape(bs, hk)  # each head attends to its new token
        eager = [t.clone() for t in stores] + [torch.zeros(bs, hk)]
        traced = [t.clone() for t in stores] + [torch.zeros(bs, hk)]
        want = decode_layer(q, k, v, logits, slots, tables, lengths, *eager, 0.3)
        got = step(q, k, v, logits, slots, tables, lengths, *traced, 0.3)
        for a, b in zip(eager, traced):
            assert torch.equal(a, b)
        assert torch.equal(traced[2], logits) and torch.equal(traced[0][slots, 0], k)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, paged_decode_reference(q, traced[0], traced[1], tables, lengths, 0.3),
                                   rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_batched_torch_paged_decode_equals_the_reference():
    torch.manual_seed(1)
    for (b, hq, hkv, d, ps, npages, maxp) in [(2, 9, 3, 64, 16, 40, 6), (3, 4, 4, 48, 8, 10, 3),
                                             (1, 2, 1, 32, 32, 20, 4)]:
        q = torch.randn(b, hq, d)
        k, v = torch.randn(npages, ps, d), torch.randn(npages, ps, d)
        pt = torch.randint(0, npages, (b, hkv, maxp))
        ln = torch.randint(0, maxp * ps + 1, (b, hkv))
        ln[0, 0] = 0  # a head holding nothing gives zeros, as in the reference
        ref = paged_decode_reference(q, k, v, pt, ln)
        assert torch.allclose(paged_decode_torch(q, k, v, pt, ln, 0.3), paged_decode_reference(
            q, k, v, pt, ln, 0.3), atol=1e-5)
        assert torch.allclose(paged_decode_torch(q, k, v, pt, ln), ref, atol=1e-5)
        assert ref[0, : hq // hkv].abs().sum() == 0


def test_paged_decode_triton_equals_the_reference_under_the_interpreter():
    pytest.importorskip("triton")
    code = r"""
import torch
from kvsqueeze.kernels.paged_decode import (paged_decode_reference, paged_decode_torch,
                                            paged_decode_triton)
torch.manual_seed(0)
for (b, hq, hkv, d, ps, npages, maxp) in [(2, 9, 3, 64, 16, 40, 6), (1, 4, 4, 48, 8, 10, 3),
                                         (3, 2, 1, 32, 32, 20, 4), (2, 6, 3, 64, 64, 12, 2),
                                         (2, 9, 3, 64, 1, 600, 90),  # page size 1: the slot pool's tables
                                         (1, 2, 1, 32, 1, 600, 500)]:  # a graph's context-wide tables
    q = torch.randn(b, hq, d)
    k, v = torch.randn(npages, ps, d), torch.randn(npages, ps, d)
    pt = torch.randint(0, npages, (b, hkv, maxp))
    ln = torch.randint(0, min(maxp * ps, 150) + 1, (b, hkv))
    ln[0, 0] = 0
    if maxp == 500:
        ln[0, 0] = 131  # a head holding far fewer slots than the tables' width, over several splits
    r = paged_decode_reference(q, k, v, pt, ln)
    t = paged_decode_triton(q, k, v, pt, ln)
    err = (r - t).abs().max().item()
    assert err <= 1e-5, (b, hq, hkv, d, ps, err)
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_paged_decode_rejects_what_it_cannot_do():
    q = torch.randn(1, 3, 8)
    k = torch.randn(4, 12, 8)
    pt = torch.zeros(1, 2, 2, dtype=torch.long)
    ln = torch.ones(1, 2, dtype=torch.long)
    with pytest.raises(KvsqueezeError, match="q_heads=3"):
        paged_decode_reference(q, k, k, pt, ln)
    with pytest.raises(KvsqueezeError, match="page_size=12"):
        paged_decode_triton(torch.randn(1, 2, 8), k, k, pt, ln)
    with pytest.raises(KvsqueezeError, match="lengths=99"):
        paged_decode_reference(torch.randn(1, 2, 8), k, k, pt, torch.full((1, 2), 99))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton)")
def test_paged_decode_on_gpu():  # pragma: no cover - GPU only
    q = torch.randn(4, 9, 64, device="cuda")
    k, v = torch.randn(100, 16, 64, device="cuda"), torch.randn(100, 16, 64, device="cuda")
    pt = torch.randint(0, 100, (4, 3, 8), device="cuda")
    ln = torch.randint(0, 128, (4, 3), device="cuda")
    ref = paged_decode_reference(q.cpu(), k.cpu(), v.cpu(), pt.cpu(), ln.cpu())
    assert torch.allclose(paged_decode_triton(q, k, v, pt, ln).cpu(), ref, atol=1e-4)


def test_sglang_admission_charges_the_measured_kept_fraction():
    """The DMS prefill budget inside SGLang (closed-form case): before anything left a window it
    charges like a dense pool; once the pool has measured a kept fraction f, a request costs its
    window (and the lagging token) plus f of the rest of its prompt and of its new tokens; its whole
    extend must still fit now. The decode check counts exactly the slots the next step takes. What
    only the prefix cache holds counts as evictable, and at idle available + evictable = budget (the
    sum SGLang's strict idle check asserts)."""
    pytest.importorskip("sglang")
    from types import SimpleNamespace

    from kvsqueeze.backends.sglang import dms as sg_dms

    budget, layers, heads, w = 1024, 2, 2, 7
    st = sg_dms._State(budget, layers, heads, 4, 4, torch.float32, "cpu", rows=4, window=w, sinks=0,
                       num_tokens=budget * 16 + 1)
    alloc = SimpleNamespace(page_size=1, available_size=st.available_tokens, _kvsqueeze_dms=st)
    tree = SimpleNamespace(supports_mamba=lambda: False, evictable_size=st.evictable_tokens,
                           supports_prefix_sharing=lambda: True)
    budget_cls = sg_dms._prefill_budget_class()
    b = budget_cls(alloc, tree)
    assert b.remaining_total == budget and b.kept == 1.0
    ok, _ = b.check_prefill(extend_input_len=600, total_tokens=600 + 500 + 1, max_new_tokens=500, chunk_limit=None)
    assert not ok  # dense: 1100 tokens do not fit 1024
    # one sequence of 2 x 2 heads x 200 tokens, 3 in 4 flagged: kept fraction 1/4 measured
    flags = torch.ones(layers, heads, 200, dtype=torch.bool)
    flags[..., ::4] = False
    flags[..., -1] = False
    _prefill(st.pool, 0, flags, torch.arange(1, 201))
    assert abs(st.kept() - 0.25) < 1e-9
    b = budget_cls(alloc, tree)
    held_now = budget - st.available_tokens()
    assert b.remaining_total == budget - held_now
    long_run = (w + 2) + -(-(600 - w - 2) // 4) + -(-500 // 4) + 1
    assert b._long_run(600, 500) == long_run
    ok, _ = b.check_prefill(extend_input_len=600, total_tokens=600 + 500 + 1, max_new_tokens=500, chunk_limit=None)
    assert ok  # 1 + long_run < remaining, and the whole extend fits now
    b.reserve(600, 500, extra_tokens=0)
    assert b.total_offset == long_run + 1 and b.current_offset == 600 + 1 + 1
    ok, _ = b.check_prefill(extend_input_len=400, total_tokens=400 + 10 + 1, max_new_tokens=10, chunk_limit=None)
    assert not ok  # its prompt does not fit beside the first one's in this pass
    # the decode check: exactly the new slots the next step takes
    assert st.slots_for_next_decode([0]) == st.pool.slots_for_append(0) == layers * heads - int(
        flags[..., 200 - w - 2].sum())  # the lagging token's slots are free for this step
    assert st.slots_for_next_decode([3]) == layers * heads  # a row not placed yet: a slot per head
    # published and finished: the cache alone holds it, all of it evictable
    st.pool.publish(torch.arange(1, 201))
    assert st.evictable_tokens() == 0  # a running request's prefix is locked
    st.release(0)
    stored = st.num_slots - st.pool.free_slots
    assert st.evictable_tokens() == -(-stored // (layers * heads))
    assert st.available_tokens() + st.evictable_tokens() == budget


def test_a_graph_step_reads_the_eager_placement_from_buffers_fixed_at_capture():
    """What SGLang's decode graph runners do with DMS: capture a batch size once (every row padding),
    then before each replay place the batch, padded to that size, into the same buffers. Two twin
    pools decode the same two requests, one eagerly and one through buffers captured for 4 rows:
    the buffers keep their addresses, the real rows read exactly the eager step's slots, tables and
    lengths, the padding rows hold nothing and write only to the scratch slot, and after the step the
    gates' decisions (padding left out) leave both pools identical. A dummy batch of padding rows only
    (no buffers) reads and stores nothing."""
    from kvsqueeze.backends.sglang.dms import _DecodeGraph, _State

    g = torch.Generator().manual_seed(8)
    n, d = 12, 4
    flags = torch.rand(L, H, n, generator=g) < 0.6
    flags[..., -1] = False
    twins = [_State(64, L, H, d, d, torch.float32, "cpu", 6, W, 0, 200) for _ in range(2)]
    eager, graph = twins
    for st in twins:
        for row in (1, 2):  # SGLang's request rows start at 1 (0 is the padding row)
            _prefill(st.pool, row, flags, torch.arange(row * 50, row * 50 + n))
    graph.graph = _DecodeGraph(graph, max_bs=4, width=32)
    (slots0, tables0, lengths0), logits0 = graph.graph.capture(4)
    tokens = torch.tensor([150, 151])
    eager.place_decode([1, 2], [n + 1, n + 1], tokens, 0)
    graph.place_decode([1, 2], [n + 1, n + 1], tokens, 2)
    (es, et, el), (gs, gt, gl) = eager.decode, graph.decode
    assert [t.data_ptr() for t in (gs, gt, gl, graph.step_logits)] == [
        t.data_ptr() for t in (slots0, tables0, lengths0, logits0)]
    assert gt.shape[1] == 4 and torch.equal(gs[:, :2 * H], es) and torch.equal(gl[:, :2], el)
    assert torch.equal(gt[:, :2, :, :et.shape[-1]].long(), et)
    assert int(gl[:, 2:].abs().sum()) == 0 and bool((gs[:, 2 * H:] == graph.scratch).all())
    q = torch.randn(4, 2 * H, d, generator=g)
    k, v = torch.randn(4 * H, d, generator=g), torch.randn(4 * H, d, generator=g)
    gate = torch.randn(L, 4, H, generator=g)
    for layer in range(L):
        want = decode_layer(q[:2], k[:2 * H], v[:2 * H], gate[layer, :2], es[layer], et[layer], el[layer],
                            eager.k, eager.v, eager.step_logits[layer])
        got = decode_layer(q, k, v, gate[layer], gs[layer], gt[layer], gl[layer], graph.k, graph.v,
                           graph.step_logits[layer])
        torch.testing.assert_close(got[:2], want)
        assert got[2:].abs().sum() == 0  # a padding row attends to nothing
    assert torch.equal(graph.k[:graph.scratch], eager.k[:eager.scratch])  # padding wrote to the scratch only
    for st in twins:
        st.finish_decode()
        st.pool.check()
    assert torch.equal(eager.pool.tables([1, 2])[0], graph.pool.tables([1, 2])[0])
    assert eager.pool.free_slots == graph.pool.free_slots
    # a batch of padding rows only (a runner's dummy forward), without buffers: nothing read or stored
    before, free = eager.k.clone(), eager.pool.free_slots
    eager.place_decode([], [], torch.zeros(0, dtype=torch.long), 3)
    (s3, t3, l3) = eager.decode
    out = decode_layer(q[:3], k[:3 * H], v[:3 * H], gate[0, :3], s3[0], t3[0], l3[0], eager.k, eager.v,
                       eager.step_logits[0])
    eager.finish_decode()
    assert out.abs().sum() == 0 and torch.equal(eager.k[:eager.scratch], before[:eager.scratch])
    assert eager.pool.free_slots == free
    eager.pool.check()
