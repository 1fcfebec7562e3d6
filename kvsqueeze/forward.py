"""The reference forward path on a Hugging Face model with kvsqueeze's attention: a dense prefill, a
continuation or greedy decoding on top of a (compressed) prefix cache, and the distribution metrics
that compare two runs. Below the methods (calibration uses it) and the evaluation; imports neither."""

from __future__ import annotations

import torch

from kvsqueeze.attention import AttentionState, attention_state
from kvsqueeze.cache import CompressedPrefix, PrefixCache


def new_cache(model, keys, values):
    """A Hugging Face ``DynamicCache`` holding per-layer ``[kv_heads, n, head_dim]`` keys and values."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k[None], v[None], layer)
    return cache


@torch.inference_mode()
def dense_prefill(model, prefix_ids: torch.Tensor, observe: int = 0):
    """Run the prefix densely; return the per-layer cache (with the attention of the last ``observe``
    queries when asked) and the last prefix logits."""
    state = AttentionState(capture_last=observe)
    with attention_state(state):
        out = model(prefix_ids[None], use_cache=True)
    pkv = out.past_key_values
    keys = [pkv.layers[i].keys[0] for i in range(len(pkv.layers))]
    values = [pkv.layers[i].values[0] for i in range(len(pkv.layers))]
    observed = [state.captured[i] for i in range(len(keys))] if observe else None
    return PrefixCache(keys=keys, values=values, observed=observed), out.logits[0, -1]


@torch.inference_mode()
def continue_with(model, prefix: CompressedPrefix, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits of ``ids`` on top of a (compressed) prefix cache: ``[len(ids), vocab]``."""
    cache = new_cache(model, prefix.keys, prefix.values)
    evicted = {} if prefix.evicted is None else dict(enumerate(prefix.evicted))
    with attention_state(AttentionState(evicted=evicted)):
        out = model(ids[None], past_key_values=cache, use_cache=True)
    return out.logits[0]


@torch.inference_mode()
def greedy_with(model, prefix: CompressedPrefix, last_logits: torch.Tensor, max_new: int,
                eos: int | None = None) -> list[int]:
    """Greedy decoding on top of a (compressed) prefix cache, one token at a time."""
    cache = new_cache(model, prefix.keys, prefix.values)
    evicted = {} if prefix.evicted is None else dict(enumerate(prefix.evicted))
    tok = int(last_logits.argmax())
    out = [tok]
    with attention_state(AttentionState(evicted=evicted)):
        for _ in range(max_new - 1):
            if eos is not None and tok == eos:
                break
            logits = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits
            tok = int(logits[0, -1].argmax())
            out.append(tok)
    return out


def distribution_metrics(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor):
    """Per-position KL(ref || other), top-1 agreement, and NLL of the targets under both."""
    ref_lp = torch.log_softmax(ref_logits.double(), -1)
    lp = torch.log_softmax(logits.double(), -1)
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0.0)
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).double()
    nll_ref = -ref_lp.gather(-1, targets[:, None])[:, 0]
    nll = -lp.gather(-1, targets[:, None])[:, 0]
    return kl, top1, nll_ref, nll
