"""kvsqueeze's attention against independent references."""

import torch

from kvsqueeze.attention import AttentionState, attention_forward, attention_state


class _Layer:
    layer_idx = 0


def _reference(q, k, v, scaling):
    """Plain causal softmax attention with keys/values repeated for GQA (no kvsqueeze code)."""
    h, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hkv, dim=1)
    v = v.repeat_interleave(h // hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) * scaling
    qn, kn = q.shape[2], k.shape[2]
    causal = torch.arange(kn)[None, :] <= (torch.arange(qn)[:, None] + kn - qn)
    s = s.masked_fill(~causal, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


def _causal_additive(qn, kn):
    causal = torch.arange(kn)[None, :] <= (torch.arange(qn)[:, None] + kn - qn)
    return torch.zeros(qn, kn).masked_fill(~causal, float("-inf"))[None, None]


def test_dense_matches_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 5, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    out, _ = attention_forward(_Layer(), q, k, v, _causal_additive(5, 12), scaling=0.3)
    torch.testing.assert_close(out, _reference(q, k, v, 0.3), rtol=1e-5, atol=1e-6)


def test_eviction_mask_equals_attention_over_gathered_tokens():
    """Hiding tokens per KV head == attending over a per-head cache that holds only the kept ones."""
    torch.manual_seed(1)
    n_prefix, n_new, hkv, g, d = 20, 3, 3, 3, 16
    q = torch.randn(1, hkv * g, n_new, d)
    k, v = torch.randn(1, hkv, n_prefix + n_new, d), torch.randn(1, hkv, n_prefix + n_new, d)
    evicted = torch.rand(hkv, n_prefix) < 0.5
    evicted[:, 0] = False
    with attention_state(AttentionState(evicted={0: evicted})):
        out, _ = attention_forward(_Layer(), q, k, v, _causal_additive(n_new, n_prefix + n_new), 0.25)
    for head in range(hkv):
        keep = torch.cat([(~evicted[head]).nonzero()[:, 0], torch.arange(n_prefix, n_prefix + n_new)])
        kh, vh = k[:, head:head + 1, keep], v[:, head:head + 1, keep]
        ref = _reference(q[:, head * g:(head + 1) * g], kh, vh, 0.25)
        torch.testing.assert_close(out[:, :, head * g:(head + 1) * g], ref, rtol=1e-5, atol=1e-6)


def test_capture_records_last_query_probabilities():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    state = AttentionState(capture_last=2)
    with attention_state(state):
        attention_forward(_Layer(), q, k, v, _causal_additive(6, 6), 0.5)
    probs = state.captured[0]
    assert probs.shape == (4, 2, 6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 2))
    kk = k.repeat_interleave(2, dim=1)
    expected = torch.stack([torch.softmax(q[0, h, -1] @ kk[0, h].T * 0.5, -1) for h in range(4)])
    torch.testing.assert_close(probs[:, -1], expected, rtol=1e-5, atol=1e-6)
