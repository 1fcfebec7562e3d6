"""The compression-method interface, its registry and the one spelling of a method setting.

A method is one class that registers itself with :func:`register`. ``kvsqueeze eval`` and the
benchmarks look methods up by name through :func:`create` or :func:`create_spec`; the registry imports
a built-in method's module only when that method is asked for.

Every hook a method can have is declared on :class:`CompressionMethod`:

- ``prepare(model)``: bind to the model before scoring (KVTC's calibration); nothing by default;
- ``compress(cache)``: compress a finished dense prefix cache; methods that decide inside the
  forward pass (DMS) do not support it and say so;
- ``run_segment(model, prefix, cont)``: prefill ``prefix`` and score ``cont`` teacher-forced on the
  compressed cache (by default: a dense prefill, ``compress``, then the continuation);
- ``greedy(model, ids, max_new)``: greedy decoding on the compressed cache (same default);
- ``segment_details()``: figures recorded with each evaluated segment.

A hook a method does not support raises :class:`Unsupported`: "method X does not support Y".

The spelling ``METHOD[:SETTING[:VARIANT]]`` (:func:`parse_spec`) means the same in ``eval``, ``serve``
and ``bench``: ``kvtc:8`` (KVTC at 8x), ``dms:4`` (the shipped 4x gates) or ``dms:DIR`` (a
checkpoint), ``fusion:0.9:token`` (threshold 0.9, per-token similarity), ``snapkv:4``. Which option the
setting and the variant set is the method's own (:meth:`CompressionMethod.spec_options`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from kvsqueeze.cache import DENSE_BYTES_PER_ELEMENT, CompressedPrefix, PrefixCache  # noqa: F401 (re-exported)
from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.forward import continue_with, dense_prefill, greedy_with


class Unsupported(KvsqueezeError):
    """A method was asked for a hook it does not have."""


class Segment(NamedTuple):
    """One scored segment: teacher-forced logits of the continuation ``[C, vocab]``, the share of the
    prefix's (layer, KV head) tokens held, the achieved ratio, and the method's own figures."""

    logits: torch.Tensor
    held: float
    ratio: float
    details: dict


class CompressionMethod:
    """Base class. Subclasses set ``name`` and a one-line ``summary`` and implement the hooks they
    support (:meth:`compress` for a method that compresses a finished cache).

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
    setting: ClassVar[str | None] = "ratio"  # the option METHOD:SETTING sets (None: no setting)
    variant: ClassVar[str | None] = None  # the option METHOD:SETTING:VARIANT sets (None: no variant)
    variants: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ratio: float | None = None, sinks: int = 4, recent: int = 64, **options):
        if ratio is None:
            ratio = self.fixed_ratio if self.fixed_ratio is not None else 1.0
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 1:
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

    # ---- the spelling METHOD[:SETTING[:VARIANT]] ---------------------------------------------------
    @classmethod
    def spec_options(cls, setting: str | None, variant: str | None) -> dict:
        """Constructor options for ``name:setting:variant`` (either may be None)."""
        out = {}
        if setting is not None:
            if cls.setting is None or cls.fixed_ratio is not None:
                raise bad_value("method", f"{cls.name}:{setting}", f"{cls.name} without a setting "
                                "(its ratio is fixed by its format)" if cls.fixed_ratio is not None
                                else f"{cls.name} without a setting")
            try:
                out[cls.setting] = float(setting)
            except ValueError:
                raise bad_value("method", f"{cls.name}:{setting}", f"{cls.name}:{cls.setting.upper()} "
                                f"with {cls.setting.upper()} a number") from None
        if variant is not None:
            if cls.variant is None:
                raise bad_value("method", f"{cls.name}:{setting}:{variant}", f"{cls.name} without a "
                                "variant")
            if cls.variants and variant not in cls.variants:
                raise bad_value("method", f"{cls.name}:{setting}:{variant}",
                                f"a variant of {cls.name}: one of {', '.join(cls.variants)}")
            out[cls.variant] = variant
        return out

    # ---- hooks -------------------------------------------------------------------------------------
    def unsupported(self, hook: str, why: str) -> Unsupported:
        return Unsupported(f"method {self.name!r} does not support {hook}: {why}")

    def prepare(self, model) -> None:
        """Bind to ``model`` before scoring (e.g. make or load a calibration). Nothing by default."""

    def compress(self, cache: PrefixCache) -> CompressedPrefix:
        """Compress one sequence's finished prefix cache."""
        raise self.unsupported("compress", "it decides inside the model's forward pass; evaluate it "
                               "with run_segment or greedy")

    def validate_prefix(self, n: int) -> None:
        """Raise a clear error if this method cannot compress an ``n``-token prefix."""
        self.exempt_slices(n)

    def run_segment(self, model, prefix: torch.Tensor, cont: torch.Tensor,
                    prefill: PrefixCache | None = None) -> Segment:
        """Prefill ``prefix`` and score ``cont`` teacher-forced on the compressed cache. ``prefill``:
        the dense prefill of ``prefix`` when the caller already has it (shared by several methods)."""
        cache = prefill if prefill is not None else dense_prefill(model, prefix, self.observation_window)[0]
        comp = self.compress(cache)
        logits = continue_with(model, comp, cont)
        total = cache.n_layers * cache.kv_heads * cache.n_tokens
        return Segment(logits, comp.tokens_held() / total, comp.ratio,
                       {**comp.details, **self.segment_details()})

    def greedy(self, model, ids: torch.Tensor, max_new: int, eos: int | None = None,
               prefill: tuple[PrefixCache, torch.Tensor] | None = None) -> tuple[list[int], float]:
        """Greedy decoding of up to ``max_new`` tokens after ``ids`` on the compressed cache; returns
        the tokens and the achieved ratio. ``prefill``: ``(dense cache, last logits)`` of ``ids``."""
        cache, last = prefill if prefill is not None else dense_prefill(model, ids, self.observation_window)
        comp = self.compress(cache)
        return greedy_with(model, comp, last, max_new, eos), comp.ratio

    def segment_details(self) -> dict:
        """Figures recorded with each evaluated segment (numbers); none by default."""
        return {}

    # ---- helpers -----------------------------------------------------------------------------------
    def exempt_slices(self, n: int) -> tuple[int, int]:
        """``(start, end)`` of the compressible middle of an ``n``-token prefix."""
        if self.sinks + self.recent > n:
            raise bad_value("prefix_tokens", n,
                            f"more than sinks + recent = {self.sinks + self.recent} tokens")
        return self.sinks, n - self.recent

    def describe(self) -> str:
        return f"{self.name}@{self.ratio:g}x"


# ---- the registry ------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[CompressionMethod]] = {}
# Built-in methods and the module that registers each; imported on first use.
BUILTIN = {
    "dense": "kvsqueeze.methods.dense",
    "window": "kvsqueeze.methods.eviction",
    "snapkv": "kvsqueeze.methods.eviction",
    "int8": "kvsqueeze.methods.quant",
    "int4": "kvsqueeze.methods.quant",
    "int2": "kvsqueeze.methods.quant",
    "dms": "kvsqueeze.methods.dms.method",
    "kvtc": "kvsqueeze.methods.kvtc.method",
    "fusion": "kvsqueeze.methods.fusion.method",
}
ALIASES = {"none": "dense", "vanilla": "dense"}


def register(cls: type[CompressionMethod]) -> type[CompressionMethod]:
    """Class decorator: make a method available under ``cls.name``."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"method name {cls.name!r} already registered by {_REGISTRY[cls.name]}")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> dict[str, type[CompressionMethod]]:
    """Every method, built-ins loaded."""
    for module in dict.fromkeys(BUILTIN.values()):
        importlib.import_module(module)
    return dict(sorted(_REGISTRY.items()))


def names() -> list[str]:
    """Every method's name, without importing any method."""
    return sorted(set(BUILTIN) | set(_REGISTRY))


def get(name: str) -> type[CompressionMethod]:
    name = ALIASES.get(name, name)
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        raise bad_value("method", name, f"one of {', '.join(names())}")
    return _REGISTRY[name]


def create(name: str, ratio: float | None = None, **options) -> CompressionMethod:
    return get(name)(ratio=ratio, **options)


@dataclass(frozen=True)
class MethodSpec:
    """``METHOD[:SETTING[:VARIANT]]``, parsed; ``setting`` and ``variant`` are text (what they set
    is the method's business)."""

    name: str
    setting: str | None = None
    variant: str | None = None

    @property
    def label(self) -> str:
        return ":".join(p for p in (self.name, self.setting, self.variant) if p is not None)

    def __str__(self) -> str:
        return self.label


def parse_spec(text: str) -> MethodSpec:
    """``"fusion:0.9:token"`` -> ``MethodSpec("fusion", "0.9", "token")``. A checkpoint path may hold
    colons only as its last part: ``dms:/path/to/dir``."""
    if not isinstance(text, str) or not text.strip():
        raise bad_value("method", text, "METHOD[:SETTING[:VARIANT]], e.g. kvtc:8 or fusion:0.9:token")
    parts = text.strip().split(":")
    name = parts[0].strip()
    if not name:
        raise bad_value("method", text, "METHOD[:SETTING[:VARIANT]] with a method name first")
    rest = [p.strip() for p in parts[1:]]
    if any(not p for p in rest):
        raise bad_value("method", text, "METHOD[:SETTING[:VARIANT]] without empty parts")
    if len(rest) > 2:
        raise bad_value("method", text, "METHOD[:SETTING[:VARIANT]]: at most two ':'")
    return MethodSpec(name, rest[0] if rest else None, rest[1] if len(rest) > 1 else None)


def create_spec(spec: MethodSpec | str, **options) -> CompressionMethod:
    """The method a spec names; ``options`` (e.g. sinks, recent) go to its constructor too, the spec's
    own setting and variant winning."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    cls = get(spec.name)
    return cls(**{**options, **cls.spec_options(spec.setting, spec.variant)})
