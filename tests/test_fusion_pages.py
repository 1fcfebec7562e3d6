"""Shared, ref-counted pages: no page leaked or double-owned after any interleaving of operations."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.methods.fusion_pages import PoolExhausted, SharedPagePool


class PoolMachine(RuleBasedStateMachine):
    """Random add / append / fuse / retain / finish / abort against a simple model of ownership."""

    def __init__(self):
        super().__init__()
        self.pool = SharedPagePool(24, 4)
        self.next_id = 0
        self.retained: list[int] = []

    @rule(n=st.integers(0, 20), share=st.booleans(), data=st.data())
    def add(self, n, share, data):
        prefix = None
        live = [s for s in self.pool.tables if self.pool.full_blocks(s) > 0]
        if share and live:
            src = data.draw(st.sampled_from(sorted(live)))
            k = data.draw(st.integers(1, min(self.pool.full_blocks(src), n // 4 or 1)))
            if k * 4 <= n:
                prefix = self.pool.tables[src][:k]
        free = self.pool.free_pages
        try:
            self.pool.add_sequence(self.next_id, n, prefix)
        except PoolExhausted:
            assert self.pool.free_pages == free  # nothing taken
        self.next_id += 1

    @precondition(lambda self: self.pool.tables)
    @rule(data=st.data(), n=st.integers(1, 9))
    def append(self, data, n):
        seq = data.draw(st.sampled_from(sorted(self.pool.tables)))
        free = self.pool.free_pages
        try:
            self.pool.append_tokens(seq, n)
        except PoolExhausted:
            assert self.pool.free_pages == free

    @precondition(lambda self: sum(self.pool.full_blocks(s) for s in self.pool.tables) >= 2)
    @rule(data=st.data())
    def fuse(self, data):
        members = [(s, b) for s in sorted(self.pool.tables) for b in range(self.pool.full_blocks(s))]
        grp = data.draw(st.lists(st.sampled_from(members), min_size=2, max_size=5, unique=True))
        before = self.pool.used_pages
        remaps = self.pool.fuse([grp])
        keep = self.pool.tables[grp[0][0]][grp[0][1]]
        assert all(self.pool.tables[s][b] == keep for s, b in grp)
        assert self.pool.used_pages <= before
        assert all(r.new_page == keep for r in remaps)

    @precondition(lambda self: self.pool.tables)
    @rule(data=st.data())
    def finish_or_abort(self, data):
        seq = data.draw(st.sampled_from(sorted(self.pool.tables)))
        self.pool.release(seq)

    @precondition(lambda self: self.pool.used_pages > 0)
    @rule(data=st.data())
    def retain(self, data):
        used = [p for p in range(self.pool.num_pages) if self.pool.ref[p] > 0]
        p = data.draw(st.sampled_from(used))
        partial = {t[-1] for s, t in self.pool.tables.items() if self.pool.tokens[s] % 4}
        if p in partial:
            with pytest.raises(KvsqueezeError, match="full page"):
                self.pool.retain(p)
            return
        self.pool.retain(p)
        self.retained.append(p)

    @precondition(lambda self: self.retained)
    @rule()
    def release_retained(self):
        self.pool.release_page(self.retained.pop())

    @invariant()
    def consistent(self):
        self.pool.check()
        distinct = {p for t in self.pool.tables.values() for p in t} | set(self.retained)
        assert self.pool.used_pages == len(distinct)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_fusion_frees_pages_for_other_requests():
    pool = SharedPagePool(6, 4)
    pool.add_sequence("a", 8)
    pool.add_sequence("b", 8)
    pool.add_sequence("c", 8)
    with pytest.raises(PoolExhausted):
        pool.add_sequence("d", 8)
    remaps = pool.fuse([[("a", 0), ("b", 0), ("c", 0)], [("a", 1), ("b", 1)]])
    assert len(remaps) == 3 and pool.free_pages == 3 and pool.fused_away == 3
    pool.add_sequence("d", 12)  # the freed pages are used
    pool.check()


def test_nothing_writes_into_a_shared_page_and_partial_blocks_never_fuse():
    pool = SharedPagePool(8, 4)
    pool.add_sequence("a", 6)
    pool.add_sequence("b", 6)
    with pytest.raises(KvsqueezeError, match="partial blocks never fuse"):
        pool.fuse([[("a", 1), ("b", 1)]])
    pool.fuse([[("a", 0), ("b", 0)]])
    pool.append_tokens("a", 2)  # fills a's own partial page: fine
    pool.append_tokens("a", 1)  # opens a new page
    pool.check()


def test_bad_pool_input():
    with pytest.raises(KvsqueezeError, match="page size above 1"):
        SharedPagePool(8, 1)
    pool = SharedPagePool(8, 4)
    pool.add_sequence("a", 4)
    with pytest.raises(KvsqueezeError, match="seq='a'"):
        pool.add_sequence("a", 4)
    with pytest.raises(KvsqueezeError, match="seq='zz'"):
        pool.release("zz")
