"""Token-eviction baselines: ``window`` (StreamingLLM-style) and ``snapkv`` (per KV head).

Both keep ``round(n / ratio)`` tokens per (layer, KV head), the ``sinks`` first and ``recent`` last
tokens among them; they differ in which middle tokens fill the rest of the budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvsqueeze.errors import bad_value
from kvsqueeze.methods.base import (
    DENSE_BYTES_PER_ELEMENT,
    CompressedPrefix,
    CompressionMethod,
    PrefixCache,
    register,
)


class _EvictionMethod(CompressionMethod):
    ratio_unit = "tokens held vs dense prefix tokens (= bytes vs 16-bit K+V)"

    def budget(self, n: int) -> int:
        keep = int(round(n / self.ratio))
        if keep < self.sinks + self.recent:
            raise bad_value(
                "ratio", self.ratio,
                f"at most {n / max(self.sinks + self.recent, 1):.2f} for a {n}-token prefix with "
                f"{self.sinks} sinks + {self.recent} recent tokens kept exact",
            )
        return keep

    def validate_prefix(self, n: int) -> None:
        self.exempt_slices(n)
        self.budget(n)

    def middle_scores(self, cache: PrefixCache, layer: int, start: int, end: int) -> torch.Tensor:
        """``[kv_heads, end - start]`` importance of each middle token; higher is kept."""
        raise NotImplementedError

    def compress(self, cache: PrefixCache) -> CompressedPrefix:
        n, h = cache.n_tokens, cache.kv_heads
        start, end = self.exempt_slices(n)
        n_mid = self.budget(n) - self.sinks - self.recent
        evicted = []
        for layer in range(cache.n_layers):
            ev = torch.ones(h, n, dtype=torch.bool)
            ev[:, :start] = False
            ev[:, end:] = False
            if n_mid > 0:
                scores = self.middle_scores(cache, layer, start, end)
                idx = scores.topk(n_mid, dim=-1).indices + start
                ev.scatter_(1, idx, False)
            evicted.append(ev)
        held = int(sum((~e).sum().item() for e in evicted))
        return CompressedPrefix(
            keys=cache.keys, values=cache.values, evicted=evicted,
            bytes_held=held * cache.head_dim * 2 * DENSE_BYTES_PER_ELEMENT,
            dense_bytes=cache.dense_bytes(),
        )


@register
class SlidingWindow(_EvictionMethod):
    name = "window"
    summary = "sliding window of the most recent tokens + attention sinks"

    def middle_scores(self, cache, layer, start, end):
        pos = torch.arange(start, end, dtype=torch.float32)
        return pos.expand(cache.kv_heads, -1)  # newest first


SNAPKV_PRESETS = ("default", "paper")


@register
class SnapKV(_EvictionMethod):
    """SnapKV (Li et al., 2024): keep the tokens the last prefix queries attend to, per KV head.

    Scores are the attention probabilities of the last ``observation_window`` (32) prefix queries,
    summed over those queries and over the query heads of each GQA group, then smoothed by pooling
    (kernel ``pool``) so that neighbours of important tokens survive with them. Two presets
    (``snapkv:RATIO:PRESET``):

    - ``default``: average pooling, the ``sinks`` first and ``recent`` last tokens (4 and 64 in
      ``kvsqueeze eval``) kept, as every eviction method here;
    - ``paper``: the published setting: max pooling, kernel 7, the 32 observation-window tokens kept,
      no fixed sinks (the preset sets sinks 0 and recent 32 whatever the caller passes).
    """

    name = "snapkv"
    summary = "attention-score eviction per KV head from a recent observation window"
    observation_window = 32
    variant, variants = "preset", SNAPKV_PRESETS

    def __init__(self, ratio=None, sinks=4, recent=64, pool: int = 7, preset: str = "default",
                 **options):
        if preset not in SNAPKV_PRESETS:
            raise bad_value("preset", preset, f"one of {', '.join(SNAPKV_PRESETS)}")
        if preset == "paper":
            sinks, recent = 0, self.observation_window
        super().__init__(ratio, sinks, recent, **options)
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1 or pool % 2 == 0:
            raise bad_value("pool", pool, "an odd kernel size >= 1")
        self.pool = pool
        self.preset = preset
        self.pooling = "max" if preset == "paper" else "avg"

    def describe(self) -> str:
        return super().describe() + ("/paper" if self.preset == "paper" else "")

    def middle_scores(self, cache, layer, start, end):
        if cache.observed is None:
            raise RuntimeError("snapkv needs the observation-window attention of the prefix")
        obs = cache.observed[layer]  # [heads, n_obs, n]
        h = cache.kv_heads
        s = obs.reshape(h, -1, obs.shape[-1]).sum(dim=1)  # [kv_heads, n]
        if self.pooling == "max":
            s = F.max_pool1d(s[:, None, :], self.pool, stride=1, padding=self.pool // 2)[:, 0, :]
        else:
            s = F.avg_pool1d(s[:, None, :], self.pool, stride=1, padding=self.pool // 2,
                             count_include_pad=False)[:, 0, :]
        return s[:, start:end]
