"""``dense``: the uncompressed cache, the reference every other method is measured against."""

from __future__ import annotations

from kvsqueeze.methods.base import CompressedPrefix, CompressionMethod, PrefixCache, register


@register
class Dense(CompressionMethod):
    name = "dense"
    summary = "no compression (reference)"
    fixed_ratio = 1.0

    def compress(self, cache: PrefixCache) -> CompressedPrefix:
        return CompressedPrefix(keys=cache.keys, values=cache.values, evicted=None,
                                bytes_held=cache.dense_bytes(), dense_bytes=cache.dense_bytes())
