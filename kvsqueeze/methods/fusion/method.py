"""CFF for ``kvsqueeze eval``: the ``fusion`` method fuses similar full blocks of one prefix's
compressible middle (any positions), in the fused layer range. Storage: one 16-bit block per group,
plus per member a 16-bit key norm, a 16-bit value norm and a 4-byte group index. Identical blocks
fuse losslessly (their mean is themselves). Spelling: ``fusion:THRESHOLD[:block|token]``."""

from __future__ import annotations

from kvsqueeze.cache import DENSE_BYTES_PER_ELEMENT, CompressedPrefix, PrefixCache
from kvsqueeze.methods.base import CompressionMethod, register
from kvsqueeze.methods.fusion.config import (
    DEFAULT_BLOCK,
    DEFAULT_SIMILARITY,
    DEFAULT_THRESHOLD,
    INDEX_BYTES,
    NORM_BYTES,
    SIMILARITIES,
    check_block_size,
    check_layers,
    check_similarity,
    check_threshold,
    parse_layers,
)
from kvsqueeze.methods.fusion.grouping import FusionStats, LayerFusion, blocks_of, fuse_layer_blocks, unblock


@register
class BlockFusion(CompressionMethod):
    """CFF: fuse similar full blocks of one prefix's compressible middle (any positions)."""

    name = "fusion"
    setting, variant, variants = "threshold", "similarity", SIMILARITIES
    summary = "joint block encoding: fuse similar KV blocks (threshold) into shared blocks"
    ratio_unit = "bytes held (one block per group + per-member norms and index) vs dense 16-bit"

    def __init__(self, ratio=None, sinks=4, recent=64, threshold: float = DEFAULT_THRESHOLD,
                 block_size: int = DEFAULT_BLOCK, layers=None, similarity: str = DEFAULT_SIMILARITY,
                 **options):
        super().__init__(1.0 if ratio is None else ratio, sinks, recent, **options)
        self.similarity = check_similarity(similarity)
        self.threshold = check_threshold(threshold)
        self.block_size = check_block_size(block_size)
        self.layers_spec = check_layers(layers)

    def describe(self) -> str:
        return f"fusion@t{self.threshold:g}/{self.similarity}"

    def compress(self, cache: PrefixCache) -> CompressedPrefix:
        n, h, d, b = cache.n_tokens, cache.kv_heads, cache.head_dim, self.block_size
        start, end = self.exempt_slices(n)
        nb = (end - start) // b
        layers = parse_layers(self.layers_spec, cache.n_layers)
        stats = FusionStats(b, self.threshold, layers)
        keys, values = list(cache.keys), list(cache.values)
        block_bytes = 2 * h * b * d * DENSE_BYTES_PER_ELEMENT
        held = cache.dense_bytes()
        for layer in layers if nb >= 2 else []:
            kb = blocks_of(cache.keys[layer], start, nb, b)
            vb = blocks_of(cache.values[layer], start, nb, b)
            kf, vf, groups = fuse_layer_blocks(kb, vb, self.threshold, None, self.similarity,
                                               h, b)
            lf = LayerFusion(layer, nb, groups)
            stats.per_layer.append(lf)
            if not lf.saved:
                continue
            k = cache.keys[layer].clone()
            v = cache.values[layer].clone()
            k[:, start:start + nb * b] = unblock(kf, h, b, d)
            v[:, start:start + nb * b] = unblock(vf, h, b, d)
            keys[layer], values[layer] = k, v
            fused_members = sum(len(g) for g in groups if len(g) > 1)
            held += (-lf.saved * block_bytes
                     + fused_members * (2 * NORM_BYTES + INDEX_BYTES))
        details = {"threshold": self.threshold, "blocks_fused_away": float(stats.saved),
                   "fused_share": stats.saved / max(stats.candidates, 1),
                   "groups": float(stats.fused_groups)}
        return CompressedPrefix(keys=keys, values=values, evicted=None, bytes_held=int(held),
                                dense_bytes=cache.dense_bytes(), details=details)
