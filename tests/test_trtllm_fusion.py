"""Block fusion for TensorRT-LLM: the remapped block tables and their reference counts (CPU), against
the pool contents they read and a stateful bookkeeping check; engine classes only where tensorrt_llm is."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from kvsqueeze.backends.trtllm import fusion as tf
from kvsqueeze.methods.fusion.config import default_layers
from kvsqueeze.errors import KvsqueezeError

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
LAYERS, TPB, HEADS, DIM = 6, 4, 2, 8


def _pool(n_blocks, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n_blocks, 2, TPB, HEADS, DIM, generator=g) for _ in range(LAYERS)]


def _keys(buffers):
    return lambda ids: tf.block_keys(buffers, ids, default_layers(LAYERS))


def test_block_keys_read_the_pool_layout():
    buffers = _pool(5)
    got = tf.block_keys(buffers, [3, 1], [2, 4])
    assert got.shape == (2, 2, TPB, HEADS * DIM)
    for n, b in enumerate([3, 1]):
        for j, layer in enumerate([2, 4]):
            for t in range(TPB):
                assert torch.equal(got[n, j, t], buffers[layer][b, 0, t].reshape(-1))
    with pytest.raises(KvsqueezeError, match="buffers"):
        tf.block_keys([torch.zeros(5, 4, 3)], [0], [0])


def test_near_duplicate_blocks_are_read_from_their_representative_until_its_owner_ends():
    buffers = _pool(12)
    for layer in buffers:  # request B's blocks 3 and 5 repeat A's blocks 0 and 2 (5 with noise)
        layer[3] = layer[0]
        layer[5] = layer[2] + 1e-3 * torch.randn_like(layer[2])
    t = tf.FusedBlockTables(12, threshold=0.99, similarity="token")
    assert t.fuse_request("A", [0, 1, 2], 3, _keys(buffers)) == 0  # the first request only registers
    assert t.fuse_request("B", [3, 4, 5, 6], 3, _keys(buffers)) == 2  # block 6: partial, never fused
    assert t.table("B", [3, 4, 5, 6]) == [0, 4, 2, 6]
    assert t.table("A", [0, 1, 2]) == [0, 1, 2]
    # what attention reads through B's table is B's own KV where not fused, and within the threshold
    # of it where fused
    keys = _keys(buffers)
    for own, read in zip([3, 4, 5], t.table("B", [3, 4, 5])):
        a, b = keys([own])[0], keys([read])[0]
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        assert float(cos.min()) >= 0.99 and (own != read or torch.equal(a, b))
    assert int(t.fusion.refs.extra[0]) == 1 and int(t.fusion.refs.extra[2]) == 1
    # a request sharing A's block 0 through the engine's own prefix reuse is left alone
    assert t.fuse_request("C", [0, 7], 1, _keys(buffers)) == 0
    assert int(t.fusion.refs.extra[0]) == 1
    assert t.finish("A") == [0, 1, 2]  # the engine frees A's blocks: B reads its own copies again
    assert t.table("B", [3, 4, 5, 6]) == [3, 4, 5, 6]
    assert int(t.fusion.refs.extra.sum()) == 0 and t.fusion.candidates(0) == []
    assert t.fusion.candidates(1) == [4]  # B's unfused block now represents index 1
    t.finish("B")
    t.finish("C")
    assert int(t.fusion.refs.extra.sum()) == 0 and not t.owners and not any(t.remap.values())
    with pytest.raises(KvsqueezeError, match="n_full"):
        t.fuse_request("D", [1, 2], 3, _keys(buffers))


def test_reference_counts_match_the_tables_through_random_admissions_and_finishes():
    """Stateful check: at every step each representative's extra holders equal the table entries
    that read it, every remap points at a block a live request owns, and a request's table never
    points outside the blocks live requests own."""
    rng = random.Random(0)
    n_blocks = 48
    buffers = _pool(n_blocks, seed=1)
    base = [layer.clone() for layer in buffers]
    t = tf.FusedBlockTables(n_blocks, threshold=0.95, similarity="block")
    free = list(range(n_blocks))
    live: dict[int, list[int]] = {}
    for step in range(200):
        if live and (rng.random() < 0.4 or len(free) < 4):
            r = rng.choice(sorted(live))
            t.finish(r)
            free += live.pop(r)
        else:
            blocks = [free.pop(rng.randrange(len(free))) for _ in range(rng.randint(1, 3))]
            for b in blocks:  # each new block: a copy of a popular pattern or fresh content
                src = rng.randrange(3) if rng.random() < 0.6 else None
                for layer, orig in zip(buffers, base):
                    layer[b] = orig[src] + 0.01 * torch.randn_like(orig[src]) if src is not None else orig[b]
            t.fuse_request(step, blocks, len(blocks), _keys(buffers))
            live[step] = blocks
        owned = {b for r in live for b in live[r]}
        want = torch.zeros(n_blocks, dtype=torch.int64)
        for r, m in t.remap.items():
            assert r in live or not m
            for i, rep in m.items():
                want[rep] += 1
                assert rep in owned and t.owners[rep] in live and rep != live[r][i]
        assert torch.equal(t.fusion.refs.extra, want), step
    assert t.stats()["pages_fused"] > 20  # the workload did fuse


@pytest.mark.skipif(HAS_TRTLLM, reason="checks the message given where TensorRT-LLM is absent")
def test_engine_class_says_what_it_needs_without_tensorrt_llm():
    with pytest.raises(KvsqueezeError, match="needs TensorRT-LLM"):
        tf.install()


@pytest.mark.skipif(not HAS_TRTLLM, reason="tensorrt_llm is not installed (CPU machine); "
                    "scripts/check_trtllm_gpu.sh runs fusion on a GPU machine")
def test_engine_class_subclasses_the_kv_cache_manager():  # pragma: no cover - GPU machines
    from tensorrt_llm._torch.pyexecutor.resource_manager import KVCacheManager

    assert issubclass(tf.FusedBlockKVCacheManager, KVCacheManager)
