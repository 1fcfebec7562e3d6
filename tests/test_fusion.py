"""Joint block encoding: grouping, fusion, batch page accounting, the Triton kernel, the workload."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze.cache import PrefixCache
from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.kernels.fusion_gram import block_gram_reference
from kvsqueeze.methods.fusion.batch import fuse_batch, radix_pages
from kvsqueeze.methods.fusion.config import parse_layers
from kvsqueeze.methods.fusion.grouping import blocks_of, fuse_vectors, group_blocks, group_items, unblock
from kvsqueeze.methods.fusion.method import BlockFusion
from kvsqueeze.methods.fusion.similarity import similarity_matrix

ROOT = Path(__file__).resolve().parents[1]


def _cache(n_layers=6, heads=3, tokens=160, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PrefixCache([torch.randn(heads, tokens, dim, generator=g) for _ in range(n_layers)],
                       [torch.randn(heads, tokens, dim, generator=g) for _ in range(n_layers)])


# ---- grouping -----------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 14), st.floats(0.05, 1.0), st.integers(0, 10_000), st.integers(1, 4))
def test_groups_partition_the_candidates_and_every_pair_in_a_group_passes(n, t, seed, rank):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, 6, generator=g)  # clustered directions
    _, gram = block_gram_reference(x)
    groups = group_blocks(gram, t)
    assert sorted(i for grp in groups for i in grp) == list(range(n))
    for grp in groups:
        for i in grp:
            for j in grp:
                assert gram[i, j] >= t - 1e-6
    if all(gram[i, j] >= t for i in range(n) for j in range(n)):
        assert len(groups) == 1
    if all(gram[i, j] < t for i in range(n) for j in range(n) if i != j):
        assert all(len(grp) == 1 for grp in groups)


def _unit(x):
    return torch.nn.functional.normalize(x.double(), dim=-1)


def test_paper_grouping_against_a_written_out_merge_tree():
    """Four one-block items: level 1 merges 0 with 1 (identical) and 2 with 3 (not similar); level 2
    compares the left representatives {0,1}, with the right ones {2}, {3}: 3 joins {0,1}, and the
    representative is the renormalised mean of the two representatives met (not of the members)."""
    e = torch.eye(4, dtype=torch.float64)
    x = torch.stack([e[0], 3 * e[0], e[1], e[0] + 0.3 * e[2]])
    groups, [rep] = group_items([x], 1, [[0], [1], [2], [3]], 0.9)
    assert groups == [[0, 1, 3], [2]]
    expected = _unit(_unit(e[0]) + _unit(x[3]))
    assert torch.allclose(rep[0], expected) and torch.allclose(rep[1], e[1])


def test_paper_grouping_never_fuses_blocks_of_one_item():
    x = torch.stack([torch.ones(5), torch.ones(5), -torch.ones(5)])
    assert group_items([x], 1, [[0, 1], [2]], 0.5)[0] == [[0], [1], [2]]
    assert group_items([x], 1, [[0], [1, 2]], 0.5)[0] == [[0, 1], [2]]


def test_paper_grouping_a_right_block_joins_its_most_similar_left_one():
    e = torch.eye(3, dtype=torch.float64)
    x = torch.stack([e[0], e[1], e[0] + 0.9 * e[1]])  # 2 is closer to 0 (cos .74) than to 1 (.67)
    groups, _ = group_items([x], 1, [[0, 1], [2]], 0.6)
    assert groups == [[0, 2], [1]]


def test_paper_grouping_values_follow_the_key_merges():
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 16, generator=g).repeat(4, 1) + 1e-3 * torch.randn(4, 16, generator=g)
    v = torch.randn(4, 16, generator=g)
    groups, (rk, rv) = group_items([k, v], 1, [[0], [1], [2], [3]], 0.99)
    assert groups == [[0, 1, 2, 3]]
    # ((0,1),(2,3)) merged: mean of the two level-1 means of unit values
    expected = _unit(_unit(_unit(v[0]) + _unit(v[1])) + _unit(_unit(v[2]) + _unit(v[3])))
    assert torch.allclose(rv[0], expected)


@pytest.mark.parametrize("n", [4, 64, 256])
def test_planted_near_duplicates_fuse_whatever_the_number_of_candidates(n):
    """A pair at cosine ~0.87-0.9 among n random blocks (threshold 0.75) fuses in every trial, in the
    grouping and through the eval method (each block its own item)."""
    g = torch.Generator().manual_seed(n)
    for _ in range(20):
        x = torch.randn(n, 96, generator=g)
        i, j = torch.randperm(n, generator=g)[:2].tolist()
        x[j] = x[i] + 0.5 * torch.randn(96, generator=g)
        assert torch.nn.functional.cosine_similarity(x[i], x[j], dim=0) > 0.8
        groups, _ = group_items([x], 1, [[r] for r in range(n)], 0.75)
        assert any(i in grp and j in grp for grp in groups)
    # the same through BlockFusion: n blocks of 16 tokens x 2 heads x 3 dims = 96, one pair planted
    heads, dim, blk = 2, 3, 16
    cache = _cache(n_layers=1, heads=heads, tokens=n * blk, dim=dim, seed=n)
    k = cache.keys[0]
    a, b = 1, n - 1
    k[:, b * blk:(b + 1) * blk] = k[:, a * blk:(a + 1) * blk] + 0.3 * torch.randn(heads, blk, dim,
                                                                                 generator=g)
    m = BlockFusion(threshold=0.75, block_size=blk, similarity="block", sinks=0, recent=0, scope="any")
    out = m.compress(cache)
    assert out.details["blocks_fused_away"] >= 1
    fused = out.keys[0]
    cos = _unit(fused[:, a * blk:(a + 1) * blk].reshape(-1)) @ _unit(fused[:, b * blk:(b + 1) * blk].reshape(-1))
    assert cos == pytest.approx(1.0, abs=1e-5)  # one shared direction


def test_grouping_respects_candidate_sets():
    x = torch.ones(4, 5)
    _, gram = block_gram_reference(x)
    assert group_blocks(gram, 0.9, [0, 2]) == [[0, 2]]
    assert group_blocks(gram, 0.9, [3]) == [[3]]


def test_fused_members_keep_their_norms_and_lie_within_the_threshold():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 32, generator=g)
    x = torch.cat([base * s + 0.05 * torch.randn(1, 32, generator=g) for s in (1, 2, 3, 0.5)])
    _, gram = block_gram_reference(x)
    groups = group_blocks(gram, 0.9)
    assert groups == [[0, 1, 2, 3]]
    y = fuse_vectors(x, groups)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(x, y)
    assert (cos >= 0.9).all()
    units = y / y.norm(dim=1, keepdim=True)
    assert torch.allclose(units, units[0].expand_as(units), atol=1e-6)  # one shared direction


def test_block_layout_round_trip():
    x = torch.randn(3, 64, 8)
    assert torch.equal(unblock(blocks_of(x, 0, 4, 16), 3, 16, 8), x)
    assert torch.equal(blocks_of(x, 16, 1, 16)[0], x[:, 16:32].reshape(-1))


def test_token_similarity_is_the_minimum_over_positions():
    x = torch.randn(3, 2 * 4 * 5)  # 3 blocks, 2 heads, 4 tokens, dim 5
    sim = similarity_matrix(x, "token", heads=2, block=4)
    per_tok = x.reshape(3, 2, 4, 5).permute(2, 0, 1, 3).reshape(4, 3, 10)
    ref = torch.stack([torch.nn.functional.cosine_similarity(per_tok[t][:, None], per_tok[t][None],
                                                             dim=-1) for t in range(4)]).amin(0)
    ref.fill_diagonal_(1.0)
    assert torch.allclose(sim, ref, atol=1e-5)


# ---- the eval method (CFF) ----------------------------------------------------------------------------
def test_when_no_pair_reaches_the_threshold_nothing_changes():
    cache = _cache()
    out = BlockFusion(threshold=1.0, block_size=16, scope="any").compress(cache)  # random: cos < 1
    for a, b in zip(out.keys + out.values, cache.keys + cache.values):
        assert torch.equal(a, b)
    assert out.bytes_held == cache.dense_bytes() and out.details["blocks_fused_away"] == 0


def test_identical_blocks_fuse_losslessly():
    cache = _cache(tokens=4 + 6 * 16 + 64)
    for layer in range(cache.n_layers):  # middle blocks 0, 2, 4 equal, and 1, 3, 5 equal (x2 scale)
        for x in (cache.keys[layer], cache.values[layer]):
            for b in (2, 4):
                x[:, 4 + b * 16:4 + (b + 1) * 16] = x[:, 4:20]
            for b in (3, 5):
                x[:, 4 + b * 16:4 + (b + 1) * 16] = 2 * x[:, 20:36]
    out = BlockFusion(threshold=0.999, block_size=16, scope="any").compress(cache)
    for a, b in zip(out.keys + out.values, cache.keys + cache.values):
        assert torch.allclose(a, b, atol=1e-5)
    fused_layers = len(parse_layers(None, cache.n_layers))
    assert out.details["blocks_fused_away"] == 4 * fused_layers
    assert out.bytes_held < cache.dense_bytes()


def test_chunk_scope_fuses_across_chunks_of_one_complete_window_only():
    """CFF as published: 16-token blocks on the grid, chunks of 32 tokens (2 blocks), windows of 2
    chunks. Block 0 copied to 1 (same chunk: never fused), to 2 (other chunk, same window: fused) and
    to 4 (next window: not fused); the last window is incomplete, so its copy of block 0 stays."""
    blk = 16
    cache = _cache(n_layers=1, tokens=7 * blk)  # windows: blocks 0-3, 4-7 (incomplete: 7 blocks)
    for x in (cache.keys[0], cache.values[0]):
        for b in (1, 2, 4, 6):
            x[:, b * blk:(b + 1) * blk] = x[:, :blk]
    m = BlockFusion(threshold=0.99, block_size=blk, scope="chunks", chunk_tokens=32, window_chunks=2,
                    sinks=0, recent=0, similarity="block")
    out = m.compress(cache)
    assert out.details["blocks_fused_away"] == 1  # block 2 into block 0 (or 1's group: one only)
    assert out.details["ratio_paper"] == pytest.approx(4 / 3)  # 4 candidate blocks, 3 distinct
    for a, b in zip(out.keys + out.values, cache.keys + cache.values):
        assert torch.allclose(a, b, atol=1e-5)  # identical blocks: lossless
    held = cache.dense_bytes() - 2 * 3 * blk * 8 * 2 + 2 * (2 * 2 + 4)
    assert out.bytes_held == held  # one block pair fused away, two members' norms and indices
    exact = BlockFusion(threshold=0.99, block_size=blk, scope="chunks", chunk_tokens=32,
                        window_chunks=2, sinks=16, recent=0, similarity="block").compress(cache)
    # block 0 is a sink now: blocks 1 (chunk 0) and 2 (chunk 1) still fuse, of 3 candidates
    assert exact.details["blocks_fused_away"] == 1 and exact.details["ratio_paper"] == pytest.approx(1.5)


def test_chunk_scope_bad_settings_are_named():
    with pytest.raises(KvsqueezeError, match="chunk_tokens=24"):
        BlockFusion(scope="chunks", chunk_tokens=24)
    with pytest.raises(KvsqueezeError, match="grouping='split'"):
        BlockFusion(grouping="split")  # the default scope is the paper's
    with pytest.raises(KvsqueezeError, match="window_chunks=0"):
        BlockFusion(scope="chunks", window_chunks=0)
    with pytest.raises(KvsqueezeError, match="scope='all'"):
        BlockFusion(scope="all")


@pytest.mark.parametrize("kw,msg", [({"threshold": 0}, "threshold=0"),
                                    ({"threshold": 1.5}, "threshold=1.5"),
                                    ({"threshold": "x"}, "threshold='x'"),
                                    ({"block_size": 0}, "block_size=0"),
                                    ({"similarity": "l2"}, "similarity='l2'")])
def test_bad_options_are_named(kw, msg):
    with pytest.raises(KvsqueezeError, match=msg):
        BlockFusion(**kw)


def test_bad_layer_ranges():
    assert parse_layers(None, 30) == list(range(2, 28))
    assert parse_layers("3-5", 30) == [3, 4, 5]
    with pytest.raises(KvsqueezeError, match="layers"):
        parse_layers("3-40", 30)
    with pytest.raises(KvsqueezeError, match="layers"):
        parse_layers("a-b", 30)


# ---- across requests (BFF) -------------------------------------------------------------------------
def test_radix_pages_share_exact_prefixes_only():
    a, b = list(range(40)), list(range(20)) + [99] + list(range(21, 40))
    pa, pb = radix_pages([a, b], 16)
    assert pa[0] == pb[0] and pa[1] != pb[1] and pa[2] != pb[2]
    assert pa[2][0] == "partial"


def test_batch_fusion_pages_against_closed_form():
    """Two requests whose tokens differ at the start but whose caches are equal: radix shares
    nothing; fusion fuses every full page of the fused layers, losslessly."""
    c = _cache(n_layers=6, tokens=40)  # 2 full pages + a partial one
    toks_a, toks_b = list(range(40)), [7] + list(range(1, 40))
    bf = fuse_batch([c, c], [toks_a, toks_b], threshold=0.99, block_size=16)
    assert bf.pages_dense == 6 and bf.pages_radix == 6
    fused = len(parse_layers(None, 6))  # layers 2, 3
    assert bf.layer_pages_fused == [6 if layer not in (2, 3) else 4 for layer in range(6)]
    assert bf.pages_fused == pytest.approx((6 * (6 - fused) + 4 * fused) / 6)
    for r in range(2):
        for a, b in zip(bf.keys[r] + bf.values[r], c.keys + c.values):
            assert torch.allclose(a, b, atol=1e-5)


def test_batch_fusion_in_the_papers_grouping_never_fuses_pages_of_one_request():
    """Across positions (same_position=False): request 0's two pages are identical, request 1's are
    unrelated; the paper's grouping compares requests, never one request with itself, so nothing
    fuses, while complete linkage fuses request 0's pair."""
    c1, c2 = _cache(seed=1, tokens=32), _cache(seed=2, tokens=32)
    for x in c1.keys + c1.values:
        x[:, 16:32] = x[:, :16]
    toks = [list(range(32)), [5] * 32]
    paper = fuse_batch([c1, c2], toks, 0.99, same_position=False, layers="all")
    assert paper.stats.saved == 0 and paper.pages_fused == paper.pages_radix == 4
    split = fuse_batch([c1, c2], toks, 0.99, same_position=False, grouping="split", layers="all")
    assert split.pages_fused == 3
    c3 = PrefixCache([k.clone() for k in c1.keys], [v.clone() for v in c1.values])
    across = fuse_batch([c1, c3], [list(range(32)), [5] * 32], 0.99, same_position=False, layers="all")
    assert across.pages_fused == 2  # across requests all four identical pages become one


def test_batch_fusion_without_similar_pages_changes_nothing():
    c1, c2 = _cache(seed=1, tokens=48), _cache(seed=2, tokens=48)
    bf = fuse_batch([c1, c2], [list(range(48)), [5] * 48], threshold=0.9)
    assert bf.pages_fused == bf.pages_radix == 6
    for a, b in zip(bf.keys[1], c2.keys):
        assert torch.equal(a, b)


def test_batch_fusion_bad_input():
    c = _cache(tokens=32)
    with pytest.raises(KvsqueezeError, match="token_lists"):
        fuse_batch([c], [list(range(31))], 0.9)
    with pytest.raises(KvsqueezeError, match="threshold"):
        fuse_batch([c], [list(range(32))], 0.0)


# ---- the Triton kernel against its reference (interpreted on CPU) ----------------------------------
def test_triton_gram_kernel_equals_the_reference_under_the_interpreter():
    pytest.importorskip("triton")
    code = r"""
import torch
from kvsqueeze.kernels.fusion_gram import block_gram_reference, block_gram_triton
torch.manual_seed(0)
for n, d, dtype in [(1, 8, torch.float32), (5, 100, torch.float32), (37, 3072, torch.float32),
                    (70, 130, torch.float16), (33, 64, torch.float32)]:
    x = torch.randn(n, d).to(dtype)
    if n > 3:
        x[3] = 0
        x[2] = x[1] * 3
    rn, rg = block_gram_reference(x)
    tn, tg = block_gram_triton(x)
    assert (rn - tn).abs().max() <= 1e-4 * rn.abs().max().clamp_min(1), (n, d, dtype)
    assert (rg - tg).abs().max() <= 2e-5, (n, d, dtype, (rg - tg).abs().max())
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton)")
def test_triton_gram_kernel_on_gpu():  # pragma: no cover - GPU only
    from kvsqueeze.kernels.fusion_gram import block_gram_triton

    x = torch.randn(300, 3072, device="cuda")
    rn, rg = block_gram_reference(x.cpu())
    tn, tg = block_gram_triton(x)
    assert torch.allclose(tg.cpu(), rg, atol=1e-4)


# ---- the near-duplicate workload ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from kvsqueeze.model import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(None))


@pytest.mark.parametrize("kind", ["edits", "fewshot", "chat"])
def test_workload_is_deterministic_aligned_and_near_duplicate(tokenizer, kind):
    from kvsqueeze.workload import near_duplicate_workload

    reqs = near_duplicate_workload(tokenizer, kind, groups=2, per_group=4, prefix_tokens=256,
                                   scored_tokens=16, seed=3)
    again = near_duplicate_workload(tokenizer, kind, groups=2, per_group=4, prefix_tokens=256,
                                    scored_tokens=16, seed=3)
    assert reqs == again and len(reqs) == 8
    for g in range(2):
        grp = [r for r in reqs if r.group == g]
        lens = {len(r.prompt_ids) for r in grp}
        assert lens == {256} or (kind != "edits" and len(lens) == 1)
        assert all(len(r.scored_ids) == 16 for r in grp)
        a, b = grp[0].prompt_ids, grp[1].prompt_ids
        differ = sum(x != y for x, y in zip(a, b))
        # near-duplicates: few positions differ (few-shot fillers: names, numbers, items, places)
        assert 0 < differ <= (len(a) * 2 // 5 if kind == "fewshot" else len(a) // 8)
    if kind == "edits":
        assert reqs[0].prompt_ids != reqs[4].prompt_ids  # groups come from different documents


def test_workload_bad_input(tokenizer):
    from kvsqueeze.workload import near_duplicate_workload

    with pytest.raises(KvsqueezeError, match="kind='tweets'"):
        near_duplicate_workload(tokenizer, "tweets")
    with pytest.raises(KvsqueezeError, match="per_group=1"):
        near_duplicate_workload(tokenizer, "edits", per_group=1)


def test_workload_fusion_with_nothing_similar_enough_is_exactly_dense(embedded):
    """End to end on the embedded model: at threshold 1 no distinct page fuses, so every request's
    continuation is bit-identical to dense (KL 0) and radix + fusion holds what radix holds; at 0.6
    pages drop below radix."""
    from kvsqueeze.evaluate import evaluate_batch_fusion

    _, tok, model = embedded
    recs = evaluate_batch_fusion(model, tok, ["edits"], [1.0, 0.6], ["block"], per_group=3,
                                 prefix_tokens=128, scored_tokens=8)
    strict, loose = recs
    assert strict.pages_fused == strict.pages_radix and strict.kl_max == 0.0
    assert strict.pages_radix < strict.pages_dense  # the shared prefix before the first edit
    assert loose.pages_fused < loose.pages_radix and loose.kl_mean > 0


def test_shared_pages_fuse_whole_pages_in_every_layer():
    """Whole-page mode (a token-slot pool): equal caches under different tokens share every full page
    in every layer, losslessly; a page that differs in one fused layer does not fuse at all."""
    c = _cache(n_layers=6, tokens=40)
    toks_a, toks_b = list(range(40)), [7] + list(range(1, 40))
    bf = fuse_batch([c, c], [toks_a, toks_b], threshold=0.99, block_size=16, shared_pages=True)
    assert bf.layer_pages_fused == [4] * 6 and bf.pages_fused == 4
    for r in range(2):
        for a, b in zip(bf.keys[r] + bf.values[r], c.keys + c.values):
            assert torch.allclose(a, b, atol=1e-5)
    other = PrefixCache([k.clone() for k in c.keys], [v.clone() for v in c.values])
    other.keys[3][:, :16] = torch.randn(3, 16, 8)  # page 0 differs in fused layer 3 only
    bf2 = fuse_batch([c, other], [toks_a, toks_b], threshold=0.99, block_size=16, shared_pages=True)
    assert bf2.pages_fused == 5  # page 1 still fuses, page 0 does not
    assert torch.equal(bf2.keys[1][0][:, :16], other.keys[0][:, :16])


def test_online_pages_read_the_earlier_page_unchanged():
    """Online mode (what runs inside SGLang): a later request's near-duplicate page reads the earlier
    request's page as it is, in every layer (K and V); the earlier request is untouched; a page that
    differs in one decision layer keeps its own data."""
    c = _cache(n_layers=6, tokens=40)
    g = torch.Generator().manual_seed(5)
    near = PrefixCache([k + 1e-3 * torch.randn(k.shape, generator=g) for k in c.keys],
                       [v + 1e-3 * torch.randn(v.shape, generator=g) for v in c.values])
    near.keys[3][:, 16:32] = torch.randn(3, 16, 8, generator=g)  # page 1 differs in decision layer 3
    toks_a, toks_b = list(range(40)), [7] + list(range(1, 40))
    bf = fuse_batch([c, near], [toks_a, toks_b], threshold=0.99, block_size=16, shared_pages=True,
                    online=True)
    assert bf.pages_fused == 5 and bf.stats.fused_groups == 1  # page 0 of b fused into a's
    for layer in range(6):
        assert torch.equal(bf.keys[0][layer], c.keys[layer])  # the representative is never changed
        assert torch.equal(bf.keys[1][layer][:, :16], c.keys[layer][:, :16])
        assert torch.equal(bf.values[1][layer][:, :16], c.values[layer][:, :16])
        assert torch.equal(bf.keys[1][layer][:, 16:], near.keys[layer][:, 16:])
    nothing = fuse_batch([c, near], [toks_a, toks_b], threshold=1.0, block_size=16, shared_pages=True,
                         online=True)
    assert nothing.pages_fused == nothing.pages_radix
    with pytest.raises(KvsqueezeError, match="online"):
        fuse_batch([c, near], [toks_a, toks_b], 0.9, block_size=16, online=True)
