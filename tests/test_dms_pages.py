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
from kvsqueeze.methods.dms.pages import HeadPagePool, PagesExhausted

ROOT = Path(__file__).resolve().parents[1]
L, H, W, PS = 2, 2, 3, 4


def expected_held(flags: torch.Tensor, t: int, w: int) -> list[list[set[int]]]:
    """After token t: positions not flagged, or inside the window (p >= t - w)."""
    return [[{p for p in range(t + 1) if not bool(flags[layer, h, p]) or p >= t - w}
             for h in range(flags.shape[1])] for layer in range(flags.shape[0])]


class DMSPoolMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = HeadPagePool(num_pages=40, page_size=PS, n_layers=L, kv_heads=H, window=W)
        self.flags: dict[int, torch.Tensor] = {}  # per sequence, flags of every position so far
        self.next_id = 0
        self.left = self.left_evicted = 0  # expected eviction statistics

    def _count_left(self, flags, upto):
        self.left += flags[..., :upto].numel()
        self.left_evicted += int(flags[..., :upto].sum())

    @rule(n=st.integers(1, 14), seed=st.integers(0, 10_000), p=st.floats(0, 1), by_layer=st.booleans())
    def admit(self, n, seed, p, by_layer):
        g = torch.Generator().manual_seed(seed)
        flags = torch.rand(L, H, n, generator=g) < p
        free = self.pool.free_pages
        if not by_layer:
            try:
                self.pool.admit(self.next_id, flags)
                self.flags[self.next_id] = flags
                self._count_left(flags, max(0, n - 1 - W))
            except PagesExhausted:
                assert self.pool.free_pages == free
        else:  # as an engine does: one layer at a time; a layer that does not fit aborts the sequence
            self.pool.begin(self.next_id, n)
            try:
                for layer in range(L):
                    before = self.pool.free_pages
                    slots = self.pool.admit_layer(self.next_id, layer, flags[layer])
                    keep = self.pool.prefill_keep(flags[layer])
                    assert [len(x) for x in slots] == keep.sum(-1).tolist()
                    assert before - self.pool.free_pages == sum(-(-len(x) // PS) for x in slots)
                    self._count_left(flags[layer], max(0, n - 1 - W))
                self.flags[self.next_id] = flags
            except PagesExhausted:
                assert self.pool.free_pages == before  # the failing layer took nothing
                self.pool.release(self.next_id)
        self.next_id += 1

    @precondition(lambda self: self.flags)
    @rule(data=st.data(), seed=st.integers(0, 10_000), p=st.floats(0, 1))
    def decode(self, data, seed, p):
        seq = data.draw(st.sampled_from(sorted(self.flags)))
        t = self.pool.seqs[seq].seen
        g = torch.Generator().manual_seed(seed)
        new_flag = torch.rand(L, H, 1, generator=g) < p  # the new token's own (future) decision
        leaving = t - W - 1
        lf = self.flags[seq][:, :, leaving] if leaving >= 0 else None
        free = self.pool.free_pages
        need = self.pool.pages_for_append(seq, lf)
        try:
            self.pool.append(seq, lf)
            assert free - self.pool.free_pages == need  # the engine's capacity check is exact
            self.flags[seq] = torch.cat([self.flags[seq], new_flag], -1)
            if lf is not None:
                self.left += lf.numel()
                self.left_evicted += int(lf.sum())
        except PagesExhausted:
            assert need > free
            assert self.pool.free_pages == free and self.pool.seqs[seq].seen == t

    @precondition(lambda self: self.flags)
    @rule(data=st.data())
    def finish_or_abort(self, data):
        seq = data.draw(st.sampled_from(sorted(self.flags)))
        self.pool.release(seq)
        del self.flags[seq]

    @invariant()
    def pool_is_consistent_and_follows_the_eviction_rule(self):
        self.pool.check()
        assert (self.pool.left, self.pool.left_evicted) == (self.left, self.left_evicted)
        for seq, flags in self.flags.items():
            t = self.pool.seqs[seq].seen - 1
            exp = expected_held(flags, t, W)
            for layer in range(L):
                for h in range(H):
                    assert self.pool.held_positions(seq, layer, h) == exp[layer][h]


TestDMSPool = DMSPoolMachine.TestCase
TestDMSPool.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)


def test_eviction_frees_room_for_more_sequences_than_a_dense_pool():
    n, num_pages = 64, 64
    dense_pages_per_seq = L * H * (n // PS)  # a head-agnostic pool would hold every token
    flags = torch.ones(L, H, n, dtype=torch.bool)
    flags[:, :, ::4] = False  # keep one token in four (4x), plus the window
    pool = HeadPagePool(num_pages, PS, L, H, W)
    admitted = 0
    while True:
        try:
            pool.admit(admitted, flags)
            admitted += 1
        except PagesExhausted:
            break
    assert num_pages // dense_pages_per_seq == 1
    assert admitted == num_pages // pool.pages_for_prefill(flags) >= 3
    pool.check()


def test_bad_pool_input():
    with pytest.raises(KvsqueezeError, match="page_size=0"):
        HeadPagePool(8, 0, 1, 1, 2)
    pool = HeadPagePool(8, 4, 1, 1, 2)
    with pytest.raises(KvsqueezeError, match=r"flags=\(1, 2, 3\)"):
        pool.admit("a", torch.zeros(1, 2, 3, dtype=torch.bool))
    pool.admit("a", torch.zeros(1, 1, 3, dtype=torch.bool))
    with pytest.raises(KvsqueezeError, match="leaving_flags"):
        pool.append("a", None)  # position 0 leaves the window at t = 3 and needs its flags


# ---- paged decode attention ----------------------------------------------------------------------
def test_pool_plus_paged_decode_equals_attention_over_the_held_tokens():
    torch.manual_seed(0)
    d, n, hq = 8, 20, 4
    pool = HeadPagePool(64, PS, 1, H, W)
    flags = torch.rand(1, H, n + 6) < 0.5
    k_all, v_all = torch.randn(H, n + 6, d), torch.randn(H, n + 6, d)
    k_pages, v_pages = torch.zeros(64, PS, d), torch.zeros(64, PS, d)
    slots = pool.admit("s", flags[:, :, :n])
    for h in range(H):
        pos = sorted(pool.held_positions("s", 0, h))
        for p, sid in zip(pos, slots[0][h].tolist()):
            k_pages.view(-1, d)[sid], v_pages.view(-1, d)[sid] = k_all[h, p], v_all[h, p]
    for t in range(n, n + 6):
        sid = pool.append("s", flags[:, :, t - W - 1])
        for h in range(H):
            k_pages.view(-1, d)[sid[0, h]], v_pages.view(-1, d)[sid[0, h]] = k_all[h, t], v_all[h, t]
    q = torch.randn(1, hq, d)
    pt = torch.full((1, H, 16), 0, dtype=torch.long)
    lengths = torch.zeros(1, H, dtype=torch.long)
    for h in range(H):
        pages = pool.page_table("s", 0, h)
        pt[0, h, :len(pages)] = torch.tensor(pages)
        lengths[0, h] = len(pool.held_positions("s", 0, h))
    out = paged_decode_reference(q, k_pages, v_pages, pt, lengths)
    pt2, ln2 = pool.page_tables(["s"])  # the tables an engine hands the kernel
    assert torch.equal(ln2[0], lengths)
    assert torch.allclose(paged_decode_torch(q, k_pages, v_pages, pt2[0], ln2[0]), out, atol=1e-5)
    t = n + 5
    for qh in range(hq):
        h = qh // (hq // H)
        held = sorted(pool.held_positions("s", 0, h))
        assert held == [p for p in range(t + 1) if not flags[0, h, p] or p >= t - W]
        p = torch.softmax(q[0, qh] @ k_all[h, held].T * d ** -0.5, -1)
        assert torch.allclose(out[0, qh], p @ v_all[h, held], atol=1e-5)


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
                                         (3, 2, 1, 32, 32, 20, 4), (2, 6, 3, 64, 64, 12, 2)]:
    q = torch.randn(b, hq, d)
    k, v = torch.randn(npages, ps, d), torch.randn(npages, ps, d)
    pt = torch.randint(0, npages, (b, hkv, maxp))
    ln = torch.randint(0, maxp * ps + 1, (b, hkv))
    ln[0, 0] = 0
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
    window plus f of the rest of its prompt and of its new tokens (and a page per head); its whole
    prompt must still fit now. The decode check counts exactly the pages the next step takes."""
    pytest.importorskip("sglang")
    from types import SimpleNamespace

    from kvsqueeze.backends.sglang import dms as sg_dms

    budget, layers, heads, w, ps = 1024, 2, 2, 7, 8
    st = sg_dms._State(budget, layers, heads, 4, 4, torch.float32, "cpu", rows=4, window=w, sinks=0, ps=ps)
    alloc = SimpleNamespace(page_size=1, available_size=st.available_tokens, _kvsqueeze_dms=st)
    tree = SimpleNamespace(supports_mamba=lambda: False, evictable_size=lambda: 0)
    budget_cls = sg_dms._prefill_budget_class()
    b = budget_cls(alloc, tree)
    assert b.remaining_total == budget and b.kept == 1.0
    ok, _ = b.check_prefill(extend_input_len=600, total_tokens=600 + 500 + 1, max_new_tokens=500, chunk_limit=None)
    assert not ok  # dense: 1100 tokens do not fit 1024
    # one sequence of 2 x 2 heads x 200 tokens, 3 in 4 flagged: kept fraction 1/4 measured
    flags = torch.ones(layers, heads, 200, dtype=torch.bool)
    flags[..., ::4] = False
    st.pool.admit(0, flags)
    assert abs(st.kept() - 0.25) < 1e-9
    b = budget_cls(alloc, tree)
    held_now = budget - st.available_tokens()
    assert b.remaining_total == budget - held_now
    long_run = (w + 1) + -(-(600 - w - 1) // 4) + -(-500 // 4) + ps
    assert b._long_run(600, 500) == long_run
    ok, _ = b.check_prefill(extend_input_len=600, total_tokens=600 + 500 + 1, max_new_tokens=500, chunk_limit=None)
    assert ok  # 1 + long_run < remaining, and the whole prompt (+ a page per head) fits now
    b.reserve(600, 500, extra_tokens=0)
    assert b.total_offset == long_run + 1 and b.current_offset == 600 + ps + 1
    ok, _ = b.check_prefill(extend_input_len=400, total_tokens=400 + 10 + 1, max_new_tokens=10, chunk_limit=None)
    assert not ok  # its prompt does not fit beside the first one's in this pass
    # the decode check: exactly the new pages the next step takes
    lf = st.leaving_flags(0)
    assert torch.equal(lf, torch.zeros(layers, heads, dtype=torch.bool))  # the ring was not written here
    assert st.pages_for_next_decode([0]) == st.pool.pages_for_append(0, lf)
    assert st.pages_for_next_decode([3]) == layers * heads  # a row not placed yet: a page per head
