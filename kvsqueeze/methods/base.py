"""The compression-method interface and its registry.

A method sees the dense KV cache of a prefix (what the engine holds after prefill) and returns what a
compressed cache would give attention back: per layer the reconstructed keys and values, optionally a
per-(layer, KV head) set of evicted tokens, and the bytes it really holds. Each method is one module
that registers itself with :func:`register`; ``kvsqueeze eval`` and the engine adapters look methods
up by name through :func:`create`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvsqueeze.errors import KvsqueezeError, bad_value

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

    @property
    def ratio(self) -> float:
        return self.dense_bytes / max(self.bytes_held, 1)

    def tokens_held(self) -> int:
        """Sum over layers and KV heads of the tokens still attendable."""
        n_layers, (h, n, _) = len(self.keys), self.keys[0].shape
        if self.evicted is None:
            return n_layers * h * n
        return int(sum((~e).sum().item() for e in self.evicted))


class CompressionMethod(abc.ABC):
    """Base class. Subclasses set ``name``, a one-line ``summary`` and implement :meth:`compress`.

    ``ratio`` is the target compression ratio against the dense 16-bit cache of the prefix.
    ``sinks`` leading and ``recent`` trailing prefix tokens are kept exact by every baseline
    (attention sinks and the recent window), unless a method documents otherwise.
    Methods with ``fixed_ratio`` (e.g. ``int4``) have one ratio set by their format.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    ratio_unit: ClassVar[str] = "bytes held vs dense 16-bit K+V of the prefix"
    fixed_ratio: ClassVar[float | None] = None
    observation_window: ClassVar[int] = 0  # prefix queries whose attention compress() needs

    def __init__(self, ratio: float | None = None, sinks: int = 4, recent: int = 64, **options):
        if ratio is None:
            ratio = self.fixed_ratio if self.fixed_ratio is not None else 1.0
        if not isinstance(ratio, (int, float)) or ratio < 1:
            raise bad_value("ratio", ratio, "a number >= 1 (the target compression ratio)")
        if sinks < 0:
            raise bad_value("sinks", sinks, "a number of tokens >= 0")
        if recent < 0:
            raise bad_value("recent", recent, "a number of tokens >= 0")
        if options:
            raise KvsqueezeError(
                f"method {self.name!r} takes no option(s) {', '.join(sorted(options))}")
        self.ratio = float(ratio)
        self.sinks = sinks
        self.recent = recent

    def exempt_slices(self, n: int) -> tuple[int, int]:
        """``(start, end)`` of the compressible middle of an ``n``-token prefix."""
        if self.sinks + self.recent > n:
            raise bad_value("prefix_tokens", n,
                            f"more than sinks + recent = {self.sinks + self.recent} tokens")
        return self.sinks, n - self.recent

    def validate_prefix(self, n: int) -> None:
        """Raise a clear error if this method cannot compress an ``n``-token prefix."""
        self.exempt_slices(n)

    @abc.abstractmethod
    def compress(self, cache: PrefixCache) -> CompressedPrefix:
        """Compress one sequence's prefix cache."""

    def describe(self) -> str:
        return f"{self.name}@{self.ratio:g}x"


_REGISTRY: dict[str, type[CompressionMethod]] = {}


def register(cls: type[CompressionMethod]) -> type[CompressionMethod]:
    """Class decorator: make a method available under ``cls.name``."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"method name {cls.name!r} already registered by {_REGISTRY[cls.name]}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    import kvsqueeze.methods  # noqa: F401  (its __init__ imports every built-in method)


def available() -> dict[str, type[CompressionMethod]]:
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type[CompressionMethod]:
    methods = available()
    if name not in methods:
        raise bad_value("method", name, f"one of {', '.join(methods)}")
    return methods[name]


def create(name: str, ratio: float | None = None, **options) -> CompressionMethod:
    return get(name)(ratio=ratio, **options)
