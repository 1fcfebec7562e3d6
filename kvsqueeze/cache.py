"""The two data types every layer shares: the dense cache of a prefix, and what a compressed cache gives
attention back. Below the methods, the reference forward path and the evaluation (imports nothing of
kvsqueeze)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DENSE_BYTES_PER_ELEMENT = 2  # ratios are stated against a 16-bit K and V cache


@dataclass(frozen=True)
class PrefixCache:
    """Dense per-layer cache of one sequence's prefix, as the model produced it.

    keys/values: one ``[kv_heads, n_tokens, head_dim]`` tensor per layer; keys carry RoPE (as stored
    by Hugging Face and SGLang). ``observed``: per layer ``[heads, n_obs, n_tokens]`` attention
    probabilities of the last ``n_obs`` prefix queries, present when the method asked for an
    observation window.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    observed: list[torch.Tensor] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    @property
    def n_tokens(self) -> int:
        return self.keys[0].shape[1]

    @property
    def kv_heads(self) -> int:
        return self.keys[0].shape[0]

    @property
    def head_dim(self) -> int:
        return self.keys[0].shape[2]

    def dense_bytes(self) -> int:
        return (self.n_layers * self.kv_heads * self.n_tokens * self.head_dim * 2
                * DENSE_BYTES_PER_ELEMENT)


@dataclass(frozen=True)
class CompressedPrefix:
    """What attention reads back from a compressed cache, and what that cache costs.

    ``evicted``: per layer a bool ``[kv_heads, n_tokens]`` (True = no longer held), or None when the
    method keeps every token. ``bytes_held``: every byte the compressed cache occupies, side
    information (scales, indices) included. ``details``: method-specific figures (numbers) that
    evaluation averages over segments (e.g. KVTC's ratio over the compressed tokens alone).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    evicted: list[torch.Tensor] | None
    bytes_held: int
    dense_bytes: int
    details: dict = field(default_factory=dict)

    @classmethod
    def dense(cls, cache: PrefixCache) -> "CompressedPrefix":
        """The uncompressed cache itself."""
        return cls(cache.keys, cache.values, None, cache.dense_bytes(), cache.dense_bytes())

    @property
    def ratio(self) -> float:
        return self.dense_bytes / max(self.bytes_held, 1)

    def tokens_held(self) -> int:
        """Sum over layers and KV heads of the tokens still attendable."""
        n_layers, (h, n, _) = len(self.keys), self.keys[0].shape
        if self.evicted is None:
            return n_layers * h * n
        return int(sum((~e).sum().item() for e in self.evicted))
