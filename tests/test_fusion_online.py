"""Online whole-page fusion (the engine-agnostic half of fusion inside SGLang)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.methods.fusion.online import OnlinePageFusion
from kvsqueeze.methods.fusion.refs import DoubleFree, PageRefs
from kvsqueeze.methods.fusion.similarity import page_similarity


def test_refs_absorb_frees_until_the_last_holder():
    refs = PageRefs(8)
    refs.share(3)
    refs.share(3)  # three holders
    assert refs.shared == 2 and refs.groups == 1
    assert refs.release(torch.tensor([3, 5, 3])).tolist() == [5]  # two of page 3's frees absorbed
    assert refs.release(torch.tensor([3])).tolist() == [3]  # the last holder lets go
    with pytest.raises(DoubleFree):
        refs.release(torch.tensor([4, 4]))


def _cos(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("similarity", ["block", "token"])
def test_page_similarity_is_the_smallest_cosine_over_layers_and_tokens(similarity):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, generator=g)  # layers, tokens, heads*dim
    cands = x + 0.5 * torch.randn(5, 3, 4, 6, generator=g)
    got = page_similarity(x, cands, similarity)
    for m in range(5):
        if similarity == "block":
            want = min(_cos(x[l], cands[m, l]) for l in range(3))
        else:
            want = min(_cos(x[l, t], cands[m, l, t]) for l in range(3) for t in range(4))
        assert got[m].item() == pytest.approx(want, abs=1e-12)


def _keys(store):
    return lambda pages: store[torch.tensor(pages)]


def test_near_duplicate_pages_fuse_into_the_most_similar_live_representative():
    g = torch.Generator().manual_seed(1)
    store = torch.zeros(10, 2, 4, 8)
    store[1], store[2] = torch.randn(2, 2, 4, 8, generator=g)  # request A: pages 1, 2 at indices 0, 1
    fus = OnlinePageFusion(10, threshold=0.95)
    assert fus.fuse([1, 2], [0, 1], _keys(store)) == {}  # nothing to fuse with: both become representatives
    store[3] = store[1] + 0.01 * torch.randn(2, 4, 8, generator=g)  # near-duplicate of 1 at index 0
    store[4] = torch.randn(2, 4, 8, generator=g)  # unrelated at index 1
    store[5] = store[1].clone()  # a copy of page 1, but at index 1: other positions never fuse
    assert fus.fuse([3, 4], [0, 1], _keys(store)) == {3: 1}
    assert fus.fuse([5], [1], _keys(store)) == {}
    assert fus.candidates(1) == [2, 4, 5]
    assert fus.stats() == {"pages_checked": 5, "pages_fused": 1, "requests": 3, "pages_saved": 1,
                           "groups": 1}
    # frees: the fused page 3 goes back at once; page 1 has two holders now
    assert fus.release(torch.tensor([3])).tolist() == [3]
    assert fus.release(torch.tensor([1])).tolist() == []
    assert fus.candidates(0) == [1]  # still live
    assert fus.release(torch.tensor([1])).tolist() == [1]
    assert fus.candidates(0) == []  # a page back on the free list is no representative


def test_below_the_threshold_nothing_changes():
    g = torch.Generator().manual_seed(2)
    store = torch.randn(6, 2, 4, 8, generator=g)
    fus = OnlinePageFusion(6, threshold=0.99)
    for p in range(6):
        assert fus.fuse([p], [0], _keys(store)) == {}
    assert fus.stats()["pages_saved"] == 0 and fus.candidates(0) == list(range(6))


def test_bad_settings_are_named():
    with pytest.raises(KvsqueezeError, match="threshold"):
        OnlinePageFusion(4, threshold=0.0)
    with pytest.raises(KvsqueezeError, match="threshold"):
        OnlinePageFusion(4, threshold=1.5)
    with pytest.raises(KvsqueezeError, match="similarity"):
        OnlinePageFusion(4, threshold=0.9, similarity="cosine")


N_PAGES, IDX = 24, 4


class EngineMachine(RuleBasedStateMachine):
    """A paged engine that uses OnlinePageFusion the way the SGLang adapter does: admit a request
    (allocate, write, fuse, repoint, free the fused pages), release holders (finish, abort, tree
    eviction), possibly several in one grouped free. Ownership must stay exact throughout."""

    def __init__(self):
        super().__init__()
        self.fus = OnlinePageFusion(N_PAGES, threshold=0.9, max_candidates=3)
        self.free = list(range(N_PAGES))
        self.store = torch.zeros(N_PAGES, 2, 4, 8)
        self.holders: dict[int, list[int]] = {}
        self.next = 0
        self.gen = torch.Generator().manual_seed(0)

    @rule(n=st.integers(1, IDX), near=st.booleans())
    def admit(self, n, near):
        if n > len(self.free):
            return
        pages = [self.free.pop() for _ in range(n)]
        for i, p in enumerate(pages):
            cands = self.fus.candidates(i)
            base = self.store[cands[-1]] if near and cands else torch.randn(2, 4, 8, generator=self.gen)
            self.store[p] = base + 0.01 * torch.randn(2, 4, 8, generator=self.gen)
        remap = self.fus.fuse(pages, list(range(n)), _keys(self.store))
        self.holders[self.next] = [remap.get(p, p) for p in pages]
        self.next += 1
        self.free += self.fus.release(torch.tensor(list(remap), dtype=torch.int64)).tolist()

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def release(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.holders)), min_size=1, max_size=3, unique=True))
        pages = torch.tensor([p for h in ids for p in self.holders.pop(h)], dtype=torch.int64)
        self.free += self.fus.release(pages).tolist()  # one grouped free, pages may repeat

    @invariant()
    def ownership_is_exact(self):
        held = Counter(p for pages in self.holders.values() for p in pages)
        assert len(self.free) == len(set(self.free))
        assert not set(self.free) & set(held)
        assert len(self.free) + len(held) == N_PAGES  # nothing leaked
        for p in range(N_PAGES):
            assert int(self.fus.refs.extra[p]) == max(held[p] - 1, 0)
        live_reps = {p for i in range(IDX) for p in self.fus.candidates(i)}
        assert live_reps <= set(held)


TestEngineMachine = EngineMachine.TestCase
TestEngineMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
