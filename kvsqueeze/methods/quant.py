"""Per-channel integer quantization baselines: ``int8``, ``int4``, ``int2``.

Keys are quantized per channel (KIVI's finding: key outliers live in fixed channels), values per
token, both asymmetric min-max over groups of ``group`` elements, with a 16-bit scale and a 16-bit
minimum per group. The sinks and recent tokens stay in 16 bits. The achieved ratio counts codes,
scales, minimums and the exempt tokens.
"""

from __future__ import annotations

import torch

from kvsqueeze.errors import bad_value
from kvsqueeze.methods.base import (
    DENSE_BYTES_PER_ELEMENT,
    CompressedPrefix,
    CompressionMethod,
    PrefixCache,
    register,
)


def fake_quantize(x: torch.Tensor, bits: int, dim: int, group: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` along ``dim`` in groups of ``group`` (asymmetric, round to nearest)."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    pad = (-n) % group
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    g = xp.reshape(*xp.shape[:-1], -1, group)
    if pad:  # padding must not widen the range of the last group
        valid = torch.arange(g.shape[-2] * group).reshape(-1, group) < n
        lo = torch.where(valid, g, torch.inf).amin(-1, keepdim=True)
        hi = torch.where(valid, g, -torch.inf).amax(-1, keepdim=True)
    else:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    levels = 2 ** bits - 1
    scale = (hi - lo).clamp_min(1e-8) / levels
    q = ((g - lo) / scale).round().clamp(0, levels)
    deq = (q * scale + lo).reshape(*xp.shape)[..., :n]
    return deq.movedim(-1, dim)


def quantized_bytes(n_elements: int, n_groups: int, bits: int) -> int:
    return (n_elements * bits + 7) // 8 + n_groups * 2 * DENSE_BYTES_PER_ELEMENT


class _IntQuant(CompressionMethod):
    bits: int

    def __init__(self, ratio=None, sinks=4, recent=64, group: int = 64, **options):
        super().__init__(ratio, sinks, recent, **options)
        if group < 1:
            raise bad_value("group", group, "a group size >= 1")
        self.group = group

    def compress(self, cache: PrefixCache) -> CompressedPrefix:
        n, h, d = cache.n_tokens, cache.kv_heads, cache.head_dim
        start, end = self.exempt_slices(n)
        m = end - start
        keys, values = [], []
        for k, v in zip(cache.keys, cache.values):
            k2, v2 = k.clone(), v.clone()
            k2[:, start:end] = fake_quantize(k[:, start:end], self.bits, dim=1, group=self.group)
            v2[:, start:end] = fake_quantize(v[:, start:end], self.bits, dim=2, group=self.group)
            keys.append(k2)
            values.append(v2)
        k_groups = h * d * -(-m // self.group)  # per channel, along tokens
        v_groups = h * m * -(-d // self.group)  # per token, along channels
        coded = (quantized_bytes(h * m * d, k_groups, self.bits)
                 + quantized_bytes(h * m * d, v_groups, self.bits))
        per_layer = coded + (n - m) * h * d * 2 * DENSE_BYTES_PER_ELEMENT
        return CompressedPrefix(keys=keys, values=values, evicted=None,
                                bytes_held=per_layer * cache.n_layers,
                                dense_bytes=cache.dense_bytes(),
                                details={"ratio_compressed": m * h * d * 2 * DENSE_BYTES_PER_ELEMENT
                                         / max(coded, 1)})


@register
class Int8(_IntQuant):
    name, bits, fixed_ratio = "int8", 8, 2.0
    summary = "8-bit per-channel keys / per-token values"


@register
class Int4(_IntQuant):
    name, bits, fixed_ratio = "int4", 4, 4.0
    summary = "4-bit per-channel keys / per-token values"


@register
class Int2(_IntQuant):
    name, bits, fixed_ratio = "int2", 2, 8.0
    summary = "2-bit per-channel keys / per-token values"
