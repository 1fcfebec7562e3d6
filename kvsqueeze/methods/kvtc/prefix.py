"""A prefix cache through the KVTC codec: its exempt tokens kept exact, the middle coded into one blob and
decoded back, and every byte it holds counted."""

from __future__ import annotations

from kvsqueeze.cache import DENSE_BYTES_PER_ELEMENT, CompressedPrefix, PrefixCache
from kvsqueeze.methods.kvtc import codec


def compress_prefix(cal: codec.Calibration, cache: PrefixCache, ratio: float, start: int,
                    end: int) -> CompressedPrefix:
    """Code tokens ``start..end-1`` of every layer at ``ratio`` (over those tokens); the rest stays
    exact. ``details``: the ratio over the coded tokens and the blob's size."""
    keys, values = [k.clone() for k in cache.keys], [v.clone() for v in cache.values]
    blob_bytes = 0
    if end > start:
        blob = codec.encode(cal, [k[:, start:end] for k in cache.keys],
                            [v[:, start:end] for v in cache.values], position=start, ratio=ratio)
        dk, dv = codec.decode(cal, blob)
        for layer in range(cache.n_layers):
            keys[layer][:, start:end] = dk[layer]
            values[layer][:, start:end] = dv[layer]
        blob_bytes = len(blob)
    middle = end - start
    per_token = cache.n_layers * cache.kv_heads * cache.head_dim * 2 * DENSE_BYTES_PER_ELEMENT
    exempt = (cache.n_tokens - middle) * per_token
    return CompressedPrefix(keys=keys, values=values, evicted=None, bytes_held=blob_bytes + exempt,
                            dense_bytes=cache.dense_bytes(),
                            details={"ratio_compressed": middle * per_token / max(blob_bytes, 1),
                                     "blob_bytes": blob_bytes})
