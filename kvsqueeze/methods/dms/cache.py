"""The DMS reference inference cache for Hugging Face models: tokens really dropped, per KV head.

Prefill runs dense attention with the eviction-aware mask, then keeps only the survivors plus the
last ``w`` tokens. Decode keeps, per (layer, KV head), its own slots and length. A ring buffer of
the window remembers which slot each of the last ``w + 1`` positions occupies; when the token
leaving the window is flagged for eviction, the new token overwrites its slot in place, else the new
token is appended. There is no compaction pass after prefill.

The cache counts what it really holds: tokens per layer and head (current and peak, and the peak of
the total), and the KV token reads of every decode step (tokens attended, summed over layers and
heads). Batch size 1.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvsqueeze.attention import current_state
from kvsqueeze.methods.dms import rule
from kvsqueeze.methods.dms.run import DMSRun, gone_after


class DMSLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, run: DMSRun, n_kv: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.run = run
        self.n_kv = n_kv
        self.window = run.config.window
        self.seen = 0
        self.pos: torch.Tensor | None = None  # [n_kv, cap] position held in each slot, -1 = free
        self.length = torch.zeros(n_kv, dtype=torch.long)  # slots ever used (high-water mark)
        self.ring = torch.full((n_kv, self.window + 1), -1, dtype=torch.long)  # slot of pos % (w+1)
        self.peak = torch.zeros(n_kv, dtype=torch.long)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def flags(self, upto: int) -> torch.Tensor:
        """``[n_kv, upto]`` eviction flags of tokens ``0..upto-1`` known so far (unknown = keep)."""
        hard, _ = self.run.eviction(self.layer_idx, upto, self.n_kv)
        return hard[0]

    def held(self) -> torch.Tensor:
        return (self.pos >= 0).sum(-1) if self.pos is not None else torch.zeros(self.n_kv, dtype=torch.long)

    def _grow(self, need: int) -> None:
        cap = self.pos.shape[1]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        pad = new - cap
        self.keys = torch.cat([self.keys, self.keys.new_zeros(self.n_kv, pad, self.keys.shape[-1])], 1)
        self.values = torch.cat([self.values, self.values.new_zeros(self.n_kv, pad, self.values.shape[-1])], 1)
        self.pos = torch.cat([self.pos, self.pos.new_full((self.n_kv, pad), -1)], 1)

    def _prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[1]
        gone = gone_after(self.run, self.layer_idx, n, self.n_kv)
        keep = [(~gone[h]).nonzero()[:, 0] for h in range(self.n_kv)]
        cap = max(len(x) for x in keep)
        d, dv = k.shape[-1], v.shape[-1]
        self.keys = k.new_zeros(self.n_kv, cap, d)
        self.values = v.new_zeros(self.n_kv, cap, dv)
        self.pos = torch.full((self.n_kv, cap), -1, dtype=torch.long)
        for h, idx in enumerate(keep):
            m = len(idx)
            self.keys[h, :m], self.values[h, :m], self.pos[h, :m] = k[h, idx], v[h, idx], idx
            self.length[h] = m
            for slot, p in enumerate(idx.tolist()):
                if rule.in_window(p, n, self.window):  # inside the window at the end of prefill
                    self.ring[h, p % (self.window + 1)] = slot

    def _append(self, k: torch.Tensor, v: torch.Tensor, t: int) -> None:
        """Place token ``t`` (``k``/``v``: ``[n_kv, d]``) per head: reuse the leaving slot or append."""
        leaving = rule.leaving(t, self.window)
        flags = self.flags(t) if leaving >= 0 else None
        r = t % (self.window + 1)
        for h in range(self.n_kv):
            slot = -1
            if leaving >= 0 and bool(flags[h, leaving]):
                slot = int(self.ring[h, r])  # the flagged token leaves the window: overwrite it
            if slot < 0:
                slot = int(self.length[h])
                self._grow(slot + 1)
                self.length[h] += 1
            self.keys[h, slot], self.values[h, slot], self.pos[h, slot] = k[h], v[h], t
            self.ring[h, r] = slot

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, v = key_states[0], value_states[0]
        q = k.shape[1]
        state = current_state()
        if self.seen == 0:  # prefill: dense masked attention over the prompt, then keep survivors
            self._prefill(k, v)
            self.seen = q
            if state is not None:
                state.valid.pop(self.layer_idx, None)
            self.peak = torch.maximum(self.peak, self.held())
            return key_states, value_states
        for i in range(q):
            self._append(k[:, i], v[:, i], self.seen + i)
        self.seen += q
        held = self.held()
        self.peak = torch.maximum(self.peak, held)
        if state is not None:
            state.valid[self.layer_idx] = self.pos >= 0
        return self.keys[None], self.values[None]

    def get_mask_sizes(self, query_length: int):
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1


class DMSCache(Cache):
    """A Hugging Face cache of :class:`DMSLayer`; decode steps must feed one token at a time."""

    def __init__(self, run: DMSRun, n_layers: int, n_kv: int):
        super().__init__(layers=[DMSLayer(i, run, n_kv) for i in range(n_layers)])
        self.run = run
        self.reads: list[int] = []
        self.peak_total = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError("DMSCache holds one sequence (batch size 1)")
        layer = self.layers[layer_idx]
        decode = layer.seen > 0
        if decode and key_states.shape[2] != 1:
            raise ValueError("after prefill, DMSCache takes one token per forward pass")
        out = layer.update(key_states, value_states)
        if layer_idx == len(self.layers) - 1:
            total = int(sum(int(lay.held().sum()) for lay in self.layers))
            self.peak_total = max(self.peak_total, total)
            if decode:
                self.reads.append(total)  # every held token (the new one included) is attended
        return out

    def held(self) -> torch.Tensor:
        """``[layers, kv_heads]`` tokens held now."""
        return torch.stack([lay.held() for lay in self.layers])

    def peak(self) -> torch.Tensor:
        """``[layers, kv_heads]`` peak tokens held per (layer, head)."""
        return torch.stack([lay.peak for lay in self.layers])

    def slots(self) -> torch.Tensor:
        """``[layers, kv_heads]`` slots ever used: flagged slots are reused, so this equals the peak."""
        return torch.stack([lay.length for lay in self.layers])
