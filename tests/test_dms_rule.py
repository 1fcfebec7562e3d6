"""The DMS rule against a written-out loop, and every engine adapter's decisions against that rule:
the reference run (DMSRun), the reference cache and the page pool (what is held, which slot a token
takes), SGLang's prefill flags and decode flag ring, TensorRT-LLM's eviction flags and keep mask.
No server starts."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.methods.dms import rule
from kvsqueeze.methods.dms.config import DMSConfig
from kvsqueeze.methods.dms.pages import HeadSlotPool
from kvsqueeze.methods.dms.run import HARD_MASK, DMSRun


def loop_flags(logits: torch.Tensor, sinks: int) -> list[list[bool]]:
    """Written out: ``logits [heads, T]``; key j is flagged iff token j + 1's logit is positive and j is
    not a sink; the newest key has no decision."""
    h, t = logits.shape
    return [[bool(j + 1 < t and logits[k, j + 1] > 0 and j >= sinks) for j in range(t)] for k in range(h)]


def loop_visible(flags: list[bool], q: int, k: int, window: int) -> bool:
    return k <= q and (q - k <= window or not flags[k])


def loop_decode(flags: list[bool], n_prompt: int, t_end: int, window: int):
    """Per step, which positions one head holds and which slot each new token takes (slots as a list
    of positions; a new token takes the leaving position's slot iff that one is flagged)."""
    slots = [p for p in range(n_prompt) if not flags[p] or p >= n_prompt - 1 - window]
    history = []
    for t in range(n_prompt, t_end):
        leaving = t - window - 1
        if leaving >= 0 and flags[leaving]:
            slots[slots.index(leaving)] = t
        else:
            slots.append(t)
        history.append(list(slots))
    return history


CASES = [(w, s, seed) for w, s, seed in ((1, 0, 0), (3, 2, 1), (5, 4, 2), (8, 1, 3))]


@pytest.mark.parametrize("window,sinks,seed", CASES)
def test_decisions_visibility_and_holdings_follow_the_written_out_rule(window, sinks, seed):
    g = torch.Generator().manual_seed(seed)
    heads, t = 3, 30
    logits = torch.randn(heads, t, generator=g) * 3
    want = loop_flags(logits, sinks)
    got = rule.decide(logits, t, sinks)
    assert got.tolist() == want
    assert 0 < int(got.sum()) < heads * t  # both kinds of decision occur
    vis = rule.visible(got, 0, t, window)
    for h in range(heads):
        for q in range(t):
            for k in range(t):
                assert bool(vis[h, q, k]) == loop_visible(want[h], q, k, window), (h, q, k)
    held = rule.held(got, window)
    assert held.tolist() == [[loop_visible(want[h], t - 1, p, window) for p in range(t)] for h in range(heads)]
    # a query's visible keys once everything is decided are exactly what is held then
    for n in range(1, t + 1):
        assert torch.equal(rule.held(rule.decide(logits[:, :n], n, sinks), window),
                           rule.visible(rule.decide(logits[:, :n], n, sinks), n - 1, 1, window)[:, 0])
    # chunked decisions (prefill then steps) give the same flags as the whole sequence
    flags = torch.zeros(heads, t, dtype=torch.bool)
    for start, n in [(0, 11), (11, 5)] + [(p, 1) for p in range(16, t)]:
        first, dec = rule.decide_chunk(logits[:, start:start + n], start, sinks)
        flags[:, first:first + dec.shape[-1]] = dec
    assert flags.tolist() == want


def test_gate_logits_scale_bias_and_per_layer_granularity():
    raw = torch.tensor([[0.01, -0.02, 0.08]])
    assert torch.allclose(rule.gate_logits(raw, 100.0, -5.0, False), torch.tensor([[-4.0, -7.0, 3.0]]))
    assert torch.allclose(rule.gate_logits(raw, 100.0, -5.0, True), torch.tensor([[-4.0]]))


@pytest.mark.parametrize("window,sinks,seed", CASES)
def test_reference_run_decides_by_the_rule(window, sinks, seed):
    """DMSRun (the Hugging Face path's state): its hard flags are the rule's, and its additive mask hides
    exactly the keys the rule says are gone."""
    g = torch.Generator().manual_seed(seed)
    heads, t = 2, 24
    logits = torch.randn(heads, t, generator=g) * 3
    cfg = DMSConfig(window=window, sinks=sinks)
    run = DMSRun(cfg)
    run.add_logits(0, logits.T[None])
    hard, _ = run.eviction(0, t, heads)
    assert hard[0].tolist() == loop_flags(logits, sinks)
    gone = run.additive_mask(0, t, t, heads)[0] == HARD_MASK
    want = loop_flags(logits, sinks)
    for h in range(heads):
        for q in range(t):
            for k in range(q + 1):
                assert bool(gone[h, q, k]) == (not loop_visible(want[h], q, k, window))


@pytest.mark.parametrize("window,sinks,seed", CASES)
@pytest.mark.parametrize("chunk", [None, 5])
def test_slot_pool_holds_as_the_written_out_loop(window, sinks, seed, chunk):
    """HeadSlotPool: after a prefill (in one pass, or in chunks of 5 as SGLang's chunked prefill
    places it) and after each decode step a head holds exactly the loop's positions, decided from the
    tokens' logits by the pool's own flag ring; every decode token takes a fresh slot, and the slot of
    a flagged token leaving the window is free one step later."""
    g = torch.Generator().manual_seed(seed)
    layers, heads, n, t_end = 2, 2, 12, 40
    logits = torch.randn(layers, heads, t_end, generator=g) * 3
    want = [loop_flags(logits[layer], sinks) for layer in range(layers)]
    pool = HeadSlotPool(400, layers, heads, window, sinks, num_tokens=100, rows=1)
    bounds = list(range(0, n, chunk or n)) + [n]
    for m, e in zip(bounds, bounds[1:]):
        pool.begin(0, torch.arange(m), e)
        for layer in range(layers):
            cf = pool.chunk_flags(0, logits[layer, :, m:e].T)
            pool.extend_place(0, layer, cf, torch.arange(m, e))
    for t in range(n, t_end):
        used = pool.num_slots - pool.free_slots
        pool.append(0, t)
        for layer in range(layers):  # the token's own forward: its logit decides t - 1
            pool.decode_flags(torch.tensor([0]), layer, torch.tensor([t]), logits[layer, :, t][None],
                              torch.tensor([t]))
        lag = rule.leaving(t, window) - 1  # flagged, it left the window one step ago: freed now
        freed = sum(bool(want[layer][h][lag]) for layer in range(layers) for h in range(heads)) if lag >= 0 else 0
        assert pool.num_slots - pool.free_slots == used + layers * heads - freed
        for layer in range(layers):
            for h in range(heads):
                hist = loop_decode(want[layer][h], n, t + 1, window)[-1]
                assert pool.held_positions(0, layer, h) == set(hist), (t, layer, h)
    pool.check()


def test_chunk_flags_and_ring_follow_the_rule():
    """The flags the pool decides for an extend from its tokens' logits (a prefill, then chunks that
    decide the position before them), and, step by step, the flags its ring holds for the token
    leaving the window."""
    g = torch.Generator().manual_seed(7)
    heads, n, t_end, window, sinks = 3, 9, 30, 4, 2
    logits = torch.randn(heads, t_end, generator=g) * 3
    want = loop_flags(logits, sinks)
    pool = HeadSlotPool(300, 1, heads, window, sinks, num_tokens=40, rows=3)
    for m, e in ((0, 4), (4, n)):
        pool.begin(2, torch.arange(m), e)
        cf = pool.chunk_flags(2, logits[:, m:e].T)  # the adapter reads [tokens, heads]
        # column 0: position m - 1 (decided by token m), the last undecided
        exp = [[want[h][p] if 0 <= p < e - 1 else False for p in range(m - 1, e)] for h in range(heads)]
        assert cf.tolist() == exp
        pool.extend_place(2, 0, cf, torch.arange(m, e))
    for t in range(n, t_end):
        pos = rule.leaving(t, window)
        leaving = pool.flags.leaving(2, t)
        if pos < 0:
            assert leaving is None
        else:
            assert leaving[0].tolist() == [want[h][pos] for h in range(heads)], t
        pool.append(2, t)
        pool.decode_flags(torch.tensor([2]), 0, torch.tensor([t]), logits[:, t][None], torch.tensor([t]))


@pytest.mark.parametrize("granularity", ["head", "layer"])
def test_trtllm_flags_and_keep_mask_follow_the_rule(granularity):
    from kvsqueeze.backends.trtllm import dms as tdms

    g = torch.Generator().manual_seed(3)
    cfg = DMSConfig(window=3, sinks=2, granularity=granularity)
    heads, t = 2, 26
    raw = torch.randn(t, heads if granularity == "head" else 1, generator=g) * 3
    logits = raw.expand(t, heads).T
    want = loop_flags(logits, cfg.sinks)
    flags = tdms.EvictionFlags(cfg, heads)
    for start, n in [(0, 9), (9, 4)] + [(s, 1) for s in range(13, t)]:
        flags.update(5, 1, start, raw[start:start + n])
        end = start + n
        have = loop_flags(logits[:, :end], cfg.sinks)  # the chunk's last token still undecided
        assert flags.flags(5, 1).T.tolist() == have
        keep = tdms.keep_mask(flags.flags(5, 1), start, n, cfg.window)
        for h in range(heads):
            for qi in range(n):
                for k in range(end):
                    assert bool(keep[h, qi, k]) == loop_visible(have[h], start + qi, k, cfg.window)
    assert flags.flags(5, 1).T.tolist() == want


def test_sglang_query_neuron_is_the_gate_and_is_zeroed_before_and_after_rope():
    """SGLang's query-neuron gates: the logit is the neuron's value before RoPE (scaled and offset by
    the rule), and the query attention sees has the neuron zero after RoPE too, where a rotation of
    the zeroed query alone would have put part of its pair back (the released code's double zero).
    (The wrapper needs no SGLang import: importing SGLang patches transformers, which the reference
    model tests run in the same process must not see.)"""
    from kvsqueeze.backends.sglang import dms as sg_dms
    from kvsqueeze.methods.dms.config import DMSConfig

    T, H, n_kv, d = 5, 4, 2, 8
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(T, H * d, generator=g), torch.randn(T, n_kv * d, generator=g)
    positions = torch.arange(T) + 7

    def rope(pos, q, k):  # neox style: dimension i pairs with i + d/2
        x = q.reshape(T, H, d)
        ang = pos[:, None, None].float() * 0.3 * (1 + torch.arange(d // 2))[None, None, :]
        a, b = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1).reshape(T, -1), k

    idx = torch.tensor([(grp * (H // n_kv)) * d + d - 1 for grp in range(n_kv)])
    cfg = DMSConfig(window=4, sinks=0, gate="query_neuron")
    out, k_out = sg_dms._QueryNeuronRope(rope, 0, idx, cfg, n_kv)(positions, q, k)
    assert torch.equal(k_out, k)
    assert bool((out[:, idx] == 0).all())
    zeroed = q.clone()
    zeroed[:, idx] = 0
    plain = rope(positions, zeroed, k)[0]
    assert plain[:, idx].abs().min() > 0  # RoPE rotates part of the pair back into the neuron
    keep = torch.ones(H * d, dtype=torch.bool)
    keep[idx] = False
    assert torch.allclose(out[:, keep], plain[:, keep])  # everything else is RoPE of the zeroed query
    assert torch.allclose(sg_dms._LOGITS.pop(0), q[:, idx] * cfg.logit_scale + cfg.logit_bias)
