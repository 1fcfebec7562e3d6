"""kvsqueeze's attention function for Hugging Face models: the dense-cache reference with two hooks.

Registered as ``attn_implementation="kvsqueeze"``. With no :class:`AttentionState` active it is plain
eager attention (GQA, additive causal mask). Inside :func:`attention_state` it can

* hide cached tokens per (layer, KV head): ``state.evicted[layer]`` is a bool ``[kv_heads, n]``
  tensor; a True entry removes key column ``j < n`` of that head from every query. This is exactly
  attention over a per-head variable-length cache holding only the kept tokens (tested against a
  gather of the kept tokens in tests/test_attention.py), so quality is measured with the real
  eviction pattern while the bookkeeping of what is held lives in the method;
* apply DMS's learned, delayed eviction (``state.dms``, see :mod:`kvsqueeze.methods.dms`);
* record the attention probabilities of the last ``state.capture_last`` queries of a pass (SnapKV's
  observation window), per layer, as ``[heads, n_obs, kv_len]``.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

ATTN_IMPL = "kvsqueeze"


@dataclass
class AttentionState:
    evicted: dict[int, torch.Tensor] = field(default_factory=dict)
    capture_last: int = 0
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    dms: object | None = None  # a kvsqueeze.methods.dms.DMSRun: learned, delayed eviction
    # per layer, bool [kv_heads, n_slots]: a physically compacted per-head cache (DMSCache) says
    # which slots hold a token; slots are not positions, so no causal or DMS mask applies then.
    valid: dict[int, torch.Tensor] = field(default_factory=dict)


_STATE: contextvars.ContextVar[AttentionState | None] = contextvars.ContextVar("kvsqueeze_attn", default=None)


def current_state() -> AttentionState | None:
    return _STATE.get()


@contextlib.contextmanager
def attention_state(state: AttentionState):
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)


def grouped_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[b, H, q, d] x [b, Hkv, k, d] -> [b, Hkv, H/Hkv, q, k]`` scaled dot products."""
    b, h, q, d = query.shape
    hkv = key.shape[1]
    qg = query.view(b, hkv, h // hkv, q, d)
    return torch.matmul(qg, key.unsqueeze(2).transpose(-1, -2)) * scaling


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    b, h, q, d = query.shape
    hkv, k_len = key.shape[1], key.shape[2]
    if scaling is None:
        scaling = d ** -0.5
    state = _STATE.get()
    layer = getattr(module, "layer_idx", None)
    if state is not None and state.dms is not None and layer is not None:
        query = state.dms.rotated_query(query, hkv)  # the query after RoPE (query-neuron gates)
    scores = grouped_scores(query, key, scaling)  # [b, hkv, g, q, k]
    if state is not None and layer in state.valid:  # decode over a compacted per-head cache
        scores = scores.masked_fill(~state.valid[layer][None, :, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, value.unsqueeze(2))
        return out.reshape(b, h, q, value.shape[-1]).transpose(1, 2).contiguous(), None
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, -k_len:].to(scores.dtype)
    if state is not None and layer in state.evicted:
        ev = state.evicted[layer]  # [hkv, n]
        n = ev.shape[-1]
        hide = torch.zeros(hkv, k_len, dtype=torch.bool, device=scores.device)
        hide[:, :n] = ev.to(scores.device)
        scores = scores.masked_fill(hide[None, :, None, None, :], float("-inf"))
    if state is not None and state.dms is not None and layer is not None:
        mask = state.dms.additive_mask(layer, q, k_len, hkv)
        if mask is not None:
            scores = scores + mask[:, :, None].to(scores.dtype)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if state is not None and state.capture_last and layer is not None:
        n_obs = min(state.capture_last, q)
        state.captured[layer] = probs[0, :, :, -n_obs:, :].reshape(h, n_obs, k_len).detach()
    out = torch.matmul(probs, value.unsqueeze(2))  # [b, hkv, g, q, d]
    out = out.reshape(b, h, q, value.shape[-1]).transpose(1, 2).contiguous()
    return out, None


_registered = False


def register() -> None:
    """Register the attention and its mask function with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPL, attention_forward)
    AttentionMaskInterface.register(ATTN_IMPL, eager_mask)
    _registered = True
