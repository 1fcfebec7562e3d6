"""TensorRT-LLM adapter: the engine-agnostic logic on CPU; engine classes only where tensorrt_llm is."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvsqueeze.backends import trtllm
from kvsqueeze.backends.trtllm.kvtc_connector import BlockLayout, KVTCBlockCache, block_hashes
from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.methods.kvtc import calibrate as kvtc
from kvsqueeze.methods.kvtc.store import KVTCStore

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


def test_layout_split_and_join_follow_the_pool_indexing():
    lay = BlockLayout(n_layers=3, kv_heads=2, tokens_per_block=4, head_dim=5)
    block = torch.randn(3, 2, 4, 2, 5)
    keys, values = lay.split(block.reshape(3, 2, -1))  # any contiguous shape of the same block
    for layer in range(3):
        for h in range(2):
            for t in range(4):
                assert torch.equal(keys[layer][h, t], block[layer, 0, t, h])
                assert torch.equal(values[layer][h, t], block[layer, 1, t, h])
    out = torch.zeros(3 * 2 * 4 * 2 * 5, dtype=torch.float16)
    lay.join_into(out, keys, values)
    assert torch.equal(out.reshape(block.shape), block.half())


def test_layout_rejects_a_block_of_another_shape():
    lay = BlockLayout(2, 2, 4, 8)
    with pytest.raises(KvsqueezeError, match=r"block=\(3, 7\): expected 256 elements"):
        lay.split(torch.zeros(3, 7))


def test_block_hashes_cover_the_whole_prefix():
    a = list(range(40))
    b = [99] + a[1:]
    ha, hb = block_hashes(a, 16), block_hashes(b, 16)
    assert len(ha) == 2  # the partial third block has no hash
    assert ha[0] != hb[0] and ha[1] != hb[1]  # same block tokens, other prefix: another key
    assert block_hashes(a[:32] + [5] * 8, 16) == ha
    assert block_hashes(a, 16, salt="model-b") != ha


@pytest.fixture(scope="module")
def tiny_setup():
    from test_kvtc import _builder_for, _tiny_llama

    model = _tiny_llama()
    cal = _builder_for(model).build(kvtc.model_fingerprint(model))
    return model, cal


def _trt_block(cache, b, tpb):
    """The K/V of block ``b`` laid out as a TensorRT-LLM pool block [layers, 2, tokens, heads, dim]."""
    s = slice(b * tpb, (b + 1) * tpb)
    return torch.stack([torch.stack([k[:, s].permute(1, 0, 2), v[:, s].permute(1, 0, 2)])
                        for k, v in zip(cache.keys, cache.values)])


def test_a_saved_block_loads_back_as_the_store_decodes_it(tiny_setup, tmp_path):
    from kvsqueeze.evaluate import dense_prefill

    model, cal = tiny_setup
    tokens = torch.randint(0, 97, (48,), generator=torch.Generator().manual_seed(0))
    cache, _ = dense_prefill(model, tokens)
    lay = BlockLayout(cal.n_layers, cal.kv_heads, 16, cal.head_dim)
    worker = KVTCBlockCache(KVTCStore(cal, 4.0, tmp_path), lay)
    hashes = block_hashes(tokens.tolist(), 16)
    for b, key in enumerate(hashes):
        assert worker.save(key, _trt_block(cache, b, 16), b)
    # a leader in another process has its own store over the same directory
    leader = KVTCBlockCache(KVTCStore(cal, 4.0, tmp_path), lay)
    assert [b for _, b in leader.matched_blocks(tokens.tolist(), 0)] == [0, 1, 2]
    assert [b for _, b in leader.matched_blocks(tokens.tolist(), 16)] == [1, 2]
    assert leader.matched_blocks(tokens.tolist(), 8) == []  # not block-aligned
    other = tokens.tolist()[:20] + [1] * 28
    assert [b for _, b in leader.matched_blocks(other, 0)] == [0]  # consecutive from the start
    out = torch.zeros(lay.numel)
    assert leader.load(hashes[1], out, 1)
    k, v, pos = KVTCStore(cal, 4.0, tmp_path).get(hashes[1])
    assert pos == 16
    ref = torch.zeros(lay.numel)
    lay.join_into(ref, k, v)
    assert torch.equal(out, ref)
    dense = _trt_block(cache, 1, 16).reshape(-1)
    rel = (out - dense).norm() / dense.norm()
    assert 0 < rel < 0.5  # lossy, and close
    assert leader.blocks_to_save(tokens.tolist(), 0) == []  # all stored already


def test_a_block_loaded_at_another_position_is_refused(tiny_setup, tmp_path):
    _, cal = tiny_setup
    lay = BlockLayout(cal.n_layers, cal.kv_heads, 16, cal.head_dim)
    c = KVTCBlockCache(KVTCStore(cal, 4.0, None), lay)
    block = torch.randn(lay.numel)
    c.save("k", block, 2)
    out = torch.full((lay.numel,), 7.0)
    assert not c.load("k", out, 3) and c.failed_loads == ["k"]
    assert torch.all(out == 7.0)  # untouched


@pytest.mark.skipif(HAS_TRTLLM, reason="tensorrt_llm is installed here")
def test_engine_classes_say_what_they_need_without_tensorrt_llm():
    assert trtllm.version() is None
    with pytest.raises(KvsqueezeError, match="needs TensorRT-LLM"):
        from kvsqueeze.backends.trtllm.kvtc_connector import KVTCConnectorLeader  # noqa: F401


@pytest.mark.skipif(not HAS_TRTLLM or not torch.cuda.is_available(),
                    reason="needs tensorrt_llm and a CUDA GPU (scripts/check_trtllm_gpu.sh)")
def test_engine_classes_subclass_the_connector_interface():  # pragma: no cover - GPU machines
    from tensorrt_llm._torch.pyexecutor.kv_cache_connector import (KvCacheConnectorScheduler,
                                                                   KvCacheConnectorWorker)

    from kvsqueeze.backends.trtllm import kvtc_connector as kc

    assert issubclass(kc.KVTCConnectorLeader, KvCacheConnectorScheduler)
    assert issubclass(kc.KVTCConnectorWorker, KvCacheConnectorWorker)
