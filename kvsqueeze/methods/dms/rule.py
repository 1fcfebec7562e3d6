"""The DMS rule, written once. The reference cache, training, the page pool and every engine adapter
(SGLang, TensorRT-LLM) call these functions instead of re-deriving them.

Per token and KV head (or per layer, granularity ``layer``: the first head's logit serves every head):

- **Gate logit**: ``raw * logit_scale + logit_bias`` (``raw``: the projection gate's output, or the
  repurposed query neuron); hard decision: evict iff the logit is ``> 0``.
- **Shift by one**: the logit computed at token ``t`` decides token ``t - 1``. Token 0's logit decides
  nothing; the newest token has no decision yet (kept).
- **Sinks**: the first ``sinks`` tokens are never evicted.
- **Delayed eviction**: key ``k`` is visible to the query at ``q`` iff ``k <= q`` and
  (``q - k <= window`` or ``k`` is not flagged).
- **What is held**: after ``n`` tokens, the positions ``p`` with ``p >= n - 1 - window`` (still in the
  window) or not flagged.
- **Slot reuse**: when token ``t`` arrives, position ``t - window - 1`` leaves the window; if it is
  flagged, ``t`` takes its slot, else ``t`` takes a new one.

Tensors of flags or logits are ``[..., tokens]`` (positions on the last axis) unless a function says
otherwise.
"""

from __future__ import annotations

import torch


NEVER = -1e4  # the logit of every decision when eviction is turned off


def gate_logits(raw: torch.Tensor, logit_scale: float, logit_bias: float, per_layer: bool,
                evict: bool = True) -> torch.Tensor:
    """``raw [..., kv_heads]`` -> logits ``[..., kv_heads]``, or ``[..., 1]`` with per-layer granularity
    (the first head's logit, which broadcasts over the heads). With ``evict`` False (eviction turned
    off, a released checkpoint's ``dms_disable_eviction``) every logit says "keep"."""
    lg = raw * logit_scale + logit_bias
    lg = lg[..., :1] if per_layer else lg
    return lg if evict else torch.full_like(lg, NEVER)


def hard(logits: torch.Tensor) -> torch.Tensor:
    """The inference decision: evict iff the logit is positive."""
    return logits > 0


def deciding(per_token: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Of per-token values (logits, relaxed decisions) of tokens ``0..n_keys-1``, the ones that decide
    keys ``0..n_keys-2``: those of tokens ``1..n_keys-1`` (shift by one)."""
    if per_token.shape[-1] < n_keys:
        raise ValueError(f"{per_token.shape[-1]} per-token values for {n_keys} keys")
    return per_token[..., 1:n_keys]


def with_newest(decided: torch.Tensor, keep) -> torch.Tensor:
    """Decisions of keys ``0..n-2`` completed with the newest key's, which is undecided: ``keep``."""
    tail = torch.full((*decided.shape[:-1], 1), keep, dtype=decided.dtype, device=decided.device)
    return torch.cat([decided, tail], -1)


def protect_sinks(x: torch.Tensor, sinks: int, keep=False, first_position: int = 0) -> torch.Tensor:
    """Per-position decisions ``x`` of positions ``first_position..`` with the sinks (positions
    ``< sinks``) set to ``keep`` (a new tensor; gradients of the other positions flow through)."""
    n = max(0, min(sinks - first_position, x.shape[-1]))
    if not n:
        return x
    return torch.cat([torch.full_like(x[..., :n], keep), x[..., n:]], -1)


def decide(logits: torch.Tensor, n_keys: int, sinks: int) -> torch.Tensor:
    """Eviction flags ``[..., n_keys]`` of keys ``0..n_keys-1`` from the logits of those tokens."""
    return protect_sinks(with_newest(hard(deciding(logits, n_keys)), False), sinks)


def decide_chunk(logits: torch.Tensor, start: int, sinks: int) -> tuple[int, torch.Tensor]:
    """The logits of tokens ``start..start+n-1`` (``[..., n]``) decide positions ``start-1..start+n-2``.
    Returns ``(first, flags)``: the first decided position (``max(start - 1, 0)``) and their flags
    (``[..., n - 1]`` for a chunk at position 0, whose first logit decides nothing; else ``[..., n]``).
    The chunk's last token stays undecided."""
    flags = hard(logits)
    if start == 0:
        flags = flags[..., 1:]
    first = max(start - 1, 0)
    return first, protect_sinks(flags, sinks, False, first)


def decide_step(logits: torch.Tensor, t: torch.Tensor, sinks: int) -> torch.Tensor:
    """A decode step of a batch: the logits ``[batch, heads]`` of the tokens at positions ``t``
    (``[batch]``) decide positions ``t - 1`` (a sink never evicted)."""
    return hard(logits) & (t - 1 >= sinks)[:, None].to(logits.device)


def outside_window(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Where a flagged key at ``k_pos`` is gone for a query at ``q_pos`` (broadcast): ``q - k > window``."""
    return (q_pos - k_pos) > window


def visible(flags: torch.Tensor, q_start: int, q_len: int, window: int) -> torch.Tensor:
    """``flags [..., k_len]`` (``k_len = q_start + q_len``) -> bool ``[..., q_len, k_len]``: which keys
    each query ``q_start..k_len-1`` attends (causal, and a flagged key only while in the window)."""
    k_len = q_start + q_len
    if flags.shape[-1] < k_len:
        raise ValueError(f"flags of {flags.shape[-1]} positions for {k_len} keys")
    q = torch.arange(q_start, k_len, device=flags.device)[:, None]
    k = torch.arange(k_len, device=flags.device)[None, :]
    gone = flags[..., None, :k_len] & outside_window(q, k, window)
    return (k <= q) & ~gone


def in_window(position, n: int, window: int):
    """Whether ``position`` (an int or a tensor) is still in the window once ``n`` tokens were
    processed: the newest token and the ``window`` before it."""
    return position >= n - 1 - window


def held(flags: torch.Tensor, window: int) -> torch.Tensor:
    """``flags [..., n]`` -> bool ``[..., n]``: the positions still held once ``n`` tokens were
    processed (in the window, or not flagged)."""
    n = flags.shape[-1]
    return ~flags | in_window(torch.arange(n, device=flags.device), n, window)


def leaving(t: int, window: int) -> int:
    """The position that leaves the window when token ``t`` arrives (negative: none yet). If it is
    flagged, ``t`` takes its slot; otherwise ``t`` takes a new one."""
    return t - window - 1
