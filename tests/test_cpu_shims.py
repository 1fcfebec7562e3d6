"""kvsqueeze's CPU shims for SGLang, against plain references."""

import torch

from kvsqueeze.backends.sglang.cpu_shims import transfer_kv_direct


def test_transfer_kv_direct_copies_the_indexed_rows_of_every_layer():
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(40, 3, 8, generator=g) for _ in range(4)]
    dst = [torch.zeros(64, 3, 8) for _ in range(4)]
    si = torch.tensor([5, 6, 7, 8, 20, 21, 22, 23])
    di = torch.tensor([32, 33, 34, 35, 0, 1, 2, 3])
    transfer_kv_direct(src, dst, si, di, page_size=4)
    for s, d in zip(src, dst):
        want = torch.zeros(64, 3, 8)
        for a, b in zip(si.tolist(), di.tolist()):  # the reference: one row at a time
            want[b] = s[a]
        assert torch.equal(d, want)


def test_transfer_kv_direct_rejects_mismatched_arguments():
    import pytest

    with pytest.raises(ValueError):
        transfer_kv_direct([torch.zeros(2, 1)], [], torch.tensor([0]), torch.tensor([0]), 1)
    with pytest.raises(ValueError):
        transfer_kv_direct([torch.zeros(2, 1)], [torch.zeros(2, 1)], torch.tensor([0, 1]), torch.tensor([0]), 1)


def _extend_batch(prefixes, news, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = [p + n for p, n in zip(prefixes, news)]
    slots = torch.randperm(sum(seq) + 10, generator=g)  # scattered cache rows, as a pool hands out
    req_to_token = torch.zeros(len(seq), max(seq) + 4, dtype=torch.long)
    at = 0
    for i, n in enumerate(seq):
        req_to_token[i, :n] = slots[at:at + n]
        at += n
    k_cache = torch.randn(len(slots), kv_heads, dim, generator=g)
    v_cache = torch.randn(len(slots), kv_heads, dim, generator=g)
    query = torch.randn(sum(news), heads, dim, generator=g)
    return dict(query=query, k_cache=k_cache, v_cache=v_cache, req_to_token=req_to_token,
                req_pool_indices=torch.arange(len(seq)), seq_lens=torch.tensor(seq),
                extend_prefix_lens=torch.tensor(prefixes), extend_seq_lens=torch.tensor(news))


def _reference_extend(b, scaling):
    """Softmax attention written out: new query j of a sequence sees its keys 0 .. prefix + j."""
    out, at = [], 0
    group = b["query"].shape[1] // b["k_cache"].shape[1]
    for i in range(len(b["seq_lens"])):
        p, n = int(b["extend_prefix_lens"][i]), int(b["extend_seq_lens"][i])
        rows = b["req_to_token"][i, :p + n]
        k = b["k_cache"][rows].repeat_interleave(group, 1)  # [kv, heads, dim]
        v = b["v_cache"][rows].repeat_interleave(group, 1)
        for j in range(n):
            q = b["query"][at + j]  # [heads, dim]
            s = torch.einsum("hd,khd->hk", q, k[:p + j + 1]) * scaling
            out.append(torch.einsum("hk,khd->hd", s.softmax(-1), v[:p + j + 1]))
        at += n
    return torch.stack(out)


def test_prefix_extend_attends_new_tokens_only_and_matches_sglang():
    """The shimmed extend equals SGLang's own torch_native extend and a written-out reference, for
    a batch mixing a sequence without a prefix, cached prefixes, and a one-token extend."""
    import pytest

    from kvsqueeze.backends.sglang import cpu_shims

    cpu_shims.apply_pre_import()
    backend = pytest.importorskip("sglang.srt.layers.attention.torch_native_backend")
    cls = backend.TorchNativeAttnBackend
    from kvsqueeze.backends.sglang import patch

    cpu_shims.prefix_extend()
    cpu_shims.prefix_extend()  # applied once
    shim = cls._run_sdpa_forward_extend
    assert patch.is_applied(cls, "_run_sdpa_forward_extend", "cpu_shims.prefix_extend")
    original = patch.original(shim)
    assert patch.original(original) is None  # SGLang's own function, wrapped once
    for prefixes, news in (([0, 5, 12], [7, 3, 1]), ([9], [4]), ([0, 0], [3, 5])):
        b = _extend_batch(prefixes, news)
        args = (b["query"], None, b["k_cache"], b["v_cache"], b["req_to_token"], b["req_pool_indices"],
                b["seq_lens"], b["extend_prefix_lens"], b["extend_seq_lens"])
        got = shim(None, b["query"], torch.zeros_like(b["query"]), *args[2:], scaling=0.3,
                   enable_gqa=True, causal=True)
        sglang = original(None, b["query"], torch.zeros_like(b["query"]), *args[2:], scaling=0.3,
                          enable_gqa=True, causal=True)
        ref = _reference_extend(b, 0.3)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, sglang, atol=1e-5, rtol=1e-5)


def test_storage_wait_yield_sleeps_only_while_requests_wait_for_storage_on_cpu(monkeypatch):
    """SGLang's own idle turn always runs; the pause follows it only on a CPU server with a storage
    tier and pending requests (a fully idle or GPU server, or one without storage, never pauses)."""
    import time
    from types import SimpleNamespace

    from kvsqueeze.backends.sglang.cpu_shims import _yielding_on_idle

    slept, turns = [], []
    monkeypatch.setattr(time, "sleep", lambda s: slept.append(s))
    on_idle = _yielding_on_idle(lambda self: turns.append(self), pause=0.0005)
    for storage, device, idle, pause in ((True, "cpu", False, True), (True, "cpu", True, False),
                                          (False, "cpu", False, False), (True, "cuda", False, False)):
        slept.clear()
        sched = SimpleNamespace(enable_hicache_storage=storage, server_args=SimpleNamespace(device=device),
                                is_fully_idle=lambda idle=idle: idle)
        on_idle(sched)
        assert turns[-1] is sched
        assert slept == ([0.0005] if pause else [])
