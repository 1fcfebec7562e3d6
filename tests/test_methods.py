"""Baseline methods: what they keep, what they cost, and their registry."""

import pytest
import torch

from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.methods import PrefixCache, available, create
from kvsqueeze.methods.base import create_spec
from kvsqueeze.methods.quant import fake_quantize


def _cache(n=100, layers=2, h=3, d=8, observed=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(h, n, d, generator=g) for _ in range(layers)]
    vs = [torch.randn(h, n, d, generator=g) for _ in range(layers)]
    return PrefixCache(ks, vs, observed)


def test_registry_lists_baselines_and_rejects_unknown():
    assert {"dense", "window", "snapkv", "int8", "int4", "int2"} <= set(available())
    with pytest.raises(KvsqueezeError, match="method='nope'.*expected one of"):
        create("nope", 4)


def test_ratio_below_one_rejected():
    with pytest.raises(KvsqueezeError, match="ratio=0.5"):
        create("window", 0.5)


def test_dense_keeps_everything():
    c = _cache()
    out = create("dense").compress(c)
    assert out.ratio == 1.0 and out.evicted is None
    assert out.keys[0] is c.keys[0]


def test_window_keeps_sinks_and_most_recent():
    c = _cache(n=100)
    out = create("window", 4, sinks=4, recent=10).compress(c)
    kept = (~out.evicted[0][0]).nonzero()[:, 0].tolist()
    assert kept == list(range(4)) + list(range(79, 100))  # 25 tokens = 100 / 4
    assert out.ratio == pytest.approx(4.0)
    assert out.tokens_held() == 25 * 3 * 2


def test_window_ratio_too_high_for_exempt_tokens():
    with pytest.raises(KvsqueezeError, match="ratio=20.0: expected at most"):
        create("window", 20, sinks=4, recent=10).compress(_cache(n=100))


def test_snapkv_keeps_highest_attended_tokens_per_head():
    n, h = 100, 3
    observed = []
    for _ in range(2):
        att = torch.full((h * 2, 4, n), 1e-4)
        for head in range(h):  # each KV head's query heads attend to their own token
            att[head * 2:(head + 1) * 2, :, 20 + 10 * head] = 1.0
        observed.append(att)
    c = _cache(n=n, observed=observed)
    out = create("snapkv", 100 / 15, sinks=4, recent=10, pool=1).compress(c)
    for head in range(h):
        kept = set((~out.evicted[0][head]).nonzero()[:, 0].tolist())
        assert 20 + 10 * head in kept
        assert set(range(4)) <= kept and set(range(90, 100)) <= kept
        assert len(kept) == 15


def test_snapkv_paper_preset_against_a_written_out_selection():
    """The published setting: no sinks, the last 32 tokens kept, max pooling (kernel 7) of the
    summed observation-window attention; the rest of the budget by the top pooled scores."""
    n, h = 200, 3
    g = torch.Generator().manual_seed(7)
    observed = [torch.rand(h * 3, 32, n, generator=g) ** 8 for _ in range(2)]
    c = _cache(n=n, observed=observed, h=h)
    m = create_spec("snapkv:4:paper", sinks=4, recent=64)  # the preset overrides the caller's exempt tokens
    assert (m.sinks, m.recent, m.pooling) == (0, 32, "max") and m.describe() == "snapkv@4x/paper"
    out = m.compress(c)
    for layer in range(2):
        score = observed[layer].reshape(h, 3, 32, n).sum((1, 2))  # [kv heads, n]
        for head in range(h):
            pooled = [max(score[head, max(0, i - 3):i + 4].tolist()) for i in range(n)]
            top = sorted((pooled[i] for i in range(n - 32)), reverse=True)[:50 - 32]
            kept = (~out.evicted[layer][head]).nonzero()[:, 0].tolist()
            assert len(kept) == 50 and kept[-32:] == list(range(n - 32, n))
            # the kept middle tokens carry the top pooled scores (neighbours under one maximum tie)
            assert sorted((pooled[i] for i in kept[:-32]), reverse=True) == pytest.approx(top)
    default = create_spec("snapkv:4", sinks=4, recent=64)
    assert (default.sinks, default.recent, default.pooling) == (4, 64, "avg")
    with pytest.raises(KvsqueezeError, match="snapkv:4:wide"):
        create_spec("snapkv:4:wide")


def test_fake_quantize_error_bounded_and_grid_exact():
    x = torch.randn(3, 50, 8)
    for bits in (2, 4, 8):
        y = fake_quantize(x, bits, dim=1, group=16)
        # per channel, groups along dim 1: max error is half a step of that group's range
        for start in range(0, 50, 16):
            blk = x[:, start:start + 16]
            step = (blk.amax(1, keepdim=True) - blk.amin(1, keepdim=True)) / (2 ** bits - 1)
            err = (y[:, start:start + 16] - blk).abs()
            assert torch.all(err <= step / 2 + 1e-5)
    grid = torch.tensor([0.0, 1.0, 2.0, 3.0]).repeat(2, 4)[..., None]  # values on a 2-bit grid
    torch.testing.assert_close(fake_quantize(grid, 2, dim=1, group=16), grid)


def test_int4_bytes_count_codes_scales_and_exempt_tokens():
    n, h, d, layers = 100, 3, 8, 2
    c = _cache(n=n, layers=layers, h=h, d=d)
    out = create("int4", sinks=4, recent=10, group=8).compress(c)
    m = n - 14
    k_groups = h * d * -(-m // 8)
    v_groups = h * m * 1
    per_layer = (h * m * d * 4 // 8 + k_groups * 4) + (h * m * d * 4 // 8 + v_groups * 4) + 14 * h * d * 4
    assert out.bytes_held == per_layer * layers
    assert out.dense_bytes == n * h * d * 4 * layers
    # exempt tokens are exact, the middle is not
    assert torch.equal(out.keys[0][:, :4], c.keys[0][:, :4])
    assert torch.equal(out.values[0][:, 90:], c.values[0][:, 90:])
    assert not torch.equal(out.keys[0][:, 4:90], c.keys[0][:, 4:90])
