"""The per-forward state of DMS in a Hugging Face model: gate logits of every token seen so far, the
decisions they make (hard at inference, relaxed in training) and the attention mask they give.

Training relaxes the decision to ``alpha = sigmoid((logit + g1 - g2) / tau)`` with Gumbel noise. The
training mask (``forward``) is either ``soft``, the relaxed decision's ``log(1 - alpha)`` in the
forward pass (the released training code's, and the default), or ``straight_through``: the hard
decision ``alpha > 0.5`` forward, exactly as inference, with the soft mask's gradient backward.
"""

from __future__ import annotations

import torch

from kvsqueeze.errors import bad_value
from kvsqueeze.methods.dms import rule
from kvsqueeze.methods.dms.config import DMSConfig
from kvsqueeze.methods.dms.gates import zero_query_neuron

HARD_MASK = -1e4  # finite: a fully masked row can never produce NaN
_KEEP_LOGIT = -1e4  # a relaxed logit that keeps a token (newest, sinks)


class DMSRun:
    """Per-forward state of DMS: gate logits of every token seen so far, per layer.

    ``mode``: ``"hard"`` (inference: evict when logit > 0) or ``"train"`` (Gumbel-sigmoid).
    Logits accumulate across calls, so prefill followed by decode steps on the same run sees the
    whole history. ``keep_from``: keys at this position and later are never evicted (the
    evaluation's prefix-only protocol: the scored tokens are held, as every other method holds
    them); ``None``: every key is subject to the gates. ``gates``: the gate set whose hooks feed this
    run (others installed on the same model stay silent); ``None``: any installed. ``evict=False``:
    nothing is evicted, but query-neuron gates still take their neuron out of the query (the
    released code's teacher mode and ``dms_disable_eviction``).
    """

    def __init__(self, config: DMSConfig, mode: str = "hard", generator: torch.Generator | None = None,
                 noise: bool = True, forward: str = "soft", keep_from: int | None = None,
                 gates=None, evict: bool = True):
        if mode not in ("hard", "train"):
            raise bad_value("mode", mode, "'hard' or 'train'")
        if forward not in ("soft", "straight_through"):
            raise bad_value("forward", forward, "'soft' or 'straight_through'")
        if keep_from is not None and (not isinstance(keep_from, int) or keep_from < 0):
            raise bad_value("keep_from", keep_from, "a token position >= 0 or None")
        if keep_from is not None and mode == "train":
            raise bad_value("keep_from", keep_from, "None in training (every decided key is trained)")
        self.config = config
        self.mode = mode
        self.forward = forward
        self.keep_from = keep_from
        self.gates = gates
        self.evict = evict
        self.generator = generator
        self.noise = noise  # Gumbel noise in training (off only to compare with hard decisions)
        self.logits: dict[int, torch.Tensor] = {}  # layer -> [b, heads_or_1, T]
        self.soft_logits: dict[int, torch.Tensor] = {}  # layer -> relaxed logits of the decided keys
        self.alphas: dict[int, torch.Tensor] = {}  # layer -> straight-through alpha [b, h, T-1]

    def add_logits(self, layer: int, logits: torch.Tensor) -> None:
        """``logits``: ``[b, T_new, heads_or_1]`` for the tokens of this call."""
        lg = logits.transpose(1, 2)
        prev = self.logits.get(layer)
        self.logits[layer] = lg if prev is None else torch.cat([prev, lg], dim=-1)

    def _relaxed(self, layer: int, lg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gumbel-sigmoid decisions of the deciding logits: (hard, straight-through alpha)."""
        dev = self.generator.device if self.generator is not None else lg.device
        u1 = torch.rand(lg.shape, generator=self.generator, device=dev).clamp(1e-9, 1 - 1e-9)
        u2 = torch.rand(lg.shape, generator=self.generator, device=dev).clamp(1e-9, 1 - 1e-9)
        gumbel = (-torch.log(-torch.log(u1)) + torch.log(-torch.log(u2))).to(lg.device)
        if not self.noise:
            gumbel = torch.zeros_like(gumbel)
        x = (lg + gumbel.to(lg.dtype)) / self.config.tau
        soft = torch.sigmoid(x)
        hard = soft > 0.5
        self.soft_logits[layer] = x
        alpha = hard.to(soft.dtype) + soft - soft.detach()
        self.alphas[layer] = alpha  # the decided keys 0..T-2, before sinks (the compression loss's)
        return hard, alpha

    def eviction(self, layer: int, n_keys: int, n_kv: int):
        """Per-key eviction of keys ``0..n_keys-1``: (hard bool ``[b,h,n]``, ST alpha or None)."""
        lg = rule.deciding(self.logits[layer], n_keys)
        if self.mode == "train":
            hard, alpha = self._relaxed(layer, lg)
        else:
            hard, alpha = rule.hard(lg), None
        if not self.evict:
            hard, alpha = torch.zeros_like(hard), None
        sinks = self.config.sinks
        hard = rule.protect_sinks(rule.with_newest(hard, False), sinks)
        if self.keep_from is not None and self.keep_from < n_keys:
            hard[..., self.keep_from:] = False
        if hard.shape[1] == 1:
            hard = hard.expand(-1, n_kv, -1)
        if alpha is not None:
            alpha = rule.protect_sinks(rule.with_newest(alpha, 0.0), sinks, 0.0)
            if alpha.shape[1] == 1:
                alpha = alpha.expand(-1, n_kv, -1)
        return hard, alpha

    def rotated_query(self, query: torch.Tensor, n_kv: int) -> torch.Tensor:
        """The query after RoPE ``[b, heads, q, d]`` as attention must see it: query-neuron gates zero
        their neuron again (:func:`~kvsqueeze.methods.dms.gates.zero_query_neuron`)."""
        if self.config.gate != "query_neuron":
            return query
        return zero_query_neuron(query, n_kv)

    def additive_mask(self, layer: int, q_len: int, k_len: int, n_kv: int) -> torch.Tensor | None:
        """``[b, n_kv, q_len, k_len]`` additive mask for the queries of this call (causality is the
        model's own mask); None when the run does not evict."""
        if not self.evict:
            return None
        hard, alpha = self.eviction(layer, k_len, n_kv)
        q_pos = torch.arange(k_len - q_len, k_len, device=hard.device)[:, None]
        k_pos = torch.arange(k_len, device=hard.device)[None, :]
        outside = rule.outside_window(q_pos, k_pos, self.config.window)  # [q, k]
        if alpha is None:
            return torch.where(hard[:, :, None, :] & outside, HARD_MASK, 0.0)
        if self.forward == "soft":
            x = rule.protect_sinks(rule.with_newest(self.soft_logits[layer], _KEEP_LOGIT),
                                   self.config.sinks, _KEEP_LOGIT)
            if x.shape[1] == 1:
                x = x.expand(-1, n_kv, -1)
            val = torch.nn.functional.logsigmoid(-x).clamp_min(HARD_MASK)  # log(1 - alpha)
        else:
            soft = torch.log((1 - alpha).clamp_min(1e-6))  # ST: forward log(eps) where evicted
            hard_val = torch.where(alpha.detach() > 0.5, HARD_MASK, 0.0)
            val = hard_val + soft - soft.detach()
        return torch.where(outside, val[:, :, None, :], torch.zeros((), dtype=val.dtype, device=val.device))

    def evicted_fraction(self, per_sequence: bool = False) -> torch.Tensor:
        """Mean straight-through alpha over layers, heads and decided tokens (training).

        ``per_sequence``: ``[batch]``, over every decided key (0..T-2), as the released code averages
        its decisions per sequence; otherwise a scalar over the batch and keys 0..T-3 (the loss the
        shipped gates were trained with)."""
        if per_sequence:
            return torch.stack([a.mean(dim=(1, 2)) for a in self.alphas.values()]).mean(0)
        return torch.stack([a[..., :-1].mean() for a in self.alphas.values()]).mean()


def gone_after(run: DMSRun, layer: int, n_tokens: int, n_kv: int) -> torch.Tensor:
    """``[n_kv, n_tokens]``: tokens no longer held once ``n_tokens`` were processed (batch row 0)."""
    hard, _ = run.eviction(layer, n_tokens, n_kv)
    return ~rule.held(hard[0], run.config.window)


def held_after(run: DMSRun, n_tokens: int, n_kv: int) -> list[torch.Tensor]:
    """Per layer ``[n_kv]`` tokens held once ``n_tokens`` tokens were processed (batch row 0)."""
    return [(~gone_after(run, layer, n_tokens, n_kv)).sum(-1) for layer in sorted(run.logits)]
