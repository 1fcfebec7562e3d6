"""CFF for ``kvsqueeze eval``: the ``fusion`` method fuses similar full blocks of one prefix, in the
fused layer range. Spelling: ``fusion:THRESHOLD[:block|token]``; options ``grouping`` (``batch``, the
paper's, or ``split``) and ``scope``:

- ``any``: the full blocks of the compressible middle (after the sinks, before the recent tokens),
  each its own item, so any two may fuse, at any positions;
- ``chunks`` (the paper's CFF): blocks on the page grid (from token 0), split into chunks of
  ``chunk_tokens`` and windows of ``window_chunks`` consecutive chunks; a block fuses only with blocks
  of *other* chunks of its window; only complete windows fuse (the authors fuse the last N chunks once
  N chunks have been prefilled); blocks overlapping the sinks or the recent tokens stay exact.

Two ratios (``details``): ``ratio_paper``, the authors' (candidate blocks over distinct fused blocks in
the fused layers, no side information), and the record's own ratio, bytes: one 16-bit block per
group plus, per member, a 16-bit key norm, a 16-bit value norm and a 4-byte group index, against the
whole dense prefix. Identical blocks fuse losslessly (their mean is themselves)."""

from __future__ import annotations

from kvsqueeze.cache import DENSE_BYTES_PER_ELEMENT, CompressedPrefix, PrefixCache
from kvsqueeze.methods.base import CompressionMethod, register
from kvsqueeze.methods.fusion.config import (
    DEFAULT_BLOCK,
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_GROUPING,
    DEFAULT_SCOPE,
    DEFAULT_SIMILARITY,
    DEFAULT_THRESHOLD,
    DEFAULT_WINDOW_CHUNKS,
    INDEX_BYTES,
    NORM_BYTES,
    SIMILARITIES,
    check_block_size,
    check_count,
    check_grouping,
    check_layers,
    check_scope,
    check_similarity,
    check_threshold,
    parse_layers,
)
from kvsqueeze.errors import bad_value
from kvsqueeze.methods.fusion.grouping import FusionStats, LayerFusion, blocks_of, fuse_layer_blocks, unblock


@register
class BlockFusion(CompressionMethod):
    """CFF: fuse similar full blocks of one prefix (any two blocks, or across the chunks of a window)."""

    name = "fusion"
    setting, variant, variants = "threshold", "similarity", SIMILARITIES
    summary = "joint block encoding: fuse similar KV blocks (threshold) into shared blocks"
    ratio_unit = "bytes held (one block per group + per-member norms and index) vs dense 16-bit"

    def __init__(self, ratio=None, sinks=4, recent=64, threshold: float = DEFAULT_THRESHOLD,
                 block_size: int = DEFAULT_BLOCK, layers=None, similarity: str = DEFAULT_SIMILARITY,
                 grouping: str = DEFAULT_GROUPING, scope: str = DEFAULT_SCOPE,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS, window_chunks: int = DEFAULT_WINDOW_CHUNKS,
                 **options):
        super().__init__(1.0 if ratio is None else ratio, sinks, recent, **options)
        self.similarity = check_similarity(similarity)
        self.threshold = check_threshold(threshold)
        self.block_size = check_block_size(block_size)
        self.layers_spec = check_layers(layers)
        self.grouping = check_grouping(grouping)
        self.scope = check_scope(scope)
        self.chunk_tokens = check_count("chunk_tokens", chunk_tokens, "a number of tokens per chunk")
        self.window_chunks = check_count("window_chunks", window_chunks, "a number of chunks")
        if self.scope == "chunks":
            if self.chunk_tokens % self.block_size:
                raise bad_value("chunk_tokens", chunk_tokens, f"a multiple of the block size "
                                f"({self.block_size}): chunks lie on the page grid")
            if self.grouping != "batch":
                raise bad_value("grouping", grouping, "batch with scope chunks (blocks of one chunk "
                                "are never compared, which only the paper's grouping can keep)")

    def describe(self) -> str:
        out = f"fusion@t{self.threshold:g}/{self.similarity}"
        if self.grouping != DEFAULT_GROUPING:
            out += f"/{self.grouping}"
        if self.scope == "chunks":
            out += f"/chunks{self.chunk_tokens}x{self.window_chunks}"
        return out

    def validate_prefix(self, n: int) -> None:
        """A prefix with no complete window would fuse nothing (scope ``chunks``): refused."""
        super().validate_prefix(n)
        window = self.window_chunks * self.chunk_tokens
        if self.scope == "chunks" and n < window:
            raise bad_value("prefix_tokens", n, f"at least one window of {self.window_chunks} chunks x "
                            f"{self.chunk_tokens} tokens ({window}) for fusion over chunks (or fewer "
                            "--window-chunks / --chunk-tokens, or --scope any)")

    def _candidates(self, n: int) -> tuple[int, int, list[list[int]], list[int] | None]:
        """(first token, blocks from there, candidate sets of block indices, item of each block)."""
        b = self.block_size
        start, end = self.exempt_slices(n)
        if self.scope == "any":
            nb = (end - start) // b
            return start, nb, ([list(range(nb))] if nb >= 2 else []), None
        nb = n // b
        per_chunk = self.chunk_tokens // b
        window = self.window_chunks * self.chunk_tokens
        item_of = [p // per_chunk for p in range(nb)]
        sets = []
        for w in range(n // window):
            blocks = [p for p in range(w * window // b, (w + 1) * window // b)
                      if p * b >= start and (p + 1) * b <= end]
            if len({item_of[p] for p in blocks}) >= 2:
                sets.append(blocks)
        return 0, nb, sets, item_of

    def compress(self, cache: PrefixCache) -> CompressedPrefix:
        h, d, b = cache.kv_heads, cache.head_dim, self.block_size
        first, nb, sets, item_of = self._candidates(cache.n_tokens)
        layers = parse_layers(self.layers_spec, cache.n_layers)
        stats = FusionStats(b, self.threshold, layers)
        keys, values = list(cache.keys), list(cache.values)
        block_bytes = 2 * h * b * d * DENSE_BYTES_PER_ELEMENT
        held = cache.dense_bytes()
        candidates = sum(len(c) for c in sets)
        for layer in layers if sets else []:
            kb = blocks_of(cache.keys[layer], first, nb, b)
            vb = blocks_of(cache.values[layer], first, nb, b)
            kf, vf, groups = fuse_layer_blocks(kb, vb, self.threshold, sets, self.similarity, h, b,
                                               self.grouping, item_of)
            lf = LayerFusion(layer, candidates, groups)
            stats.per_layer.append(lf)
            if not lf.saved:
                continue
            k = cache.keys[layer].clone()
            v = cache.values[layer].clone()
            k[:, first:first + nb * b] = unblock(kf, h, b, d)
            v[:, first:first + nb * b] = unblock(vf, h, b, d)
            keys[layer], values[layer] = k, v
            fused_members = sum(len(g) for g in groups if len(g) > 1)
            held += (-lf.saved * block_bytes
                     + fused_members * (2 * NORM_BYTES + INDEX_BYTES))
        details = {"threshold": self.threshold, "blocks_fused_away": float(stats.saved),
                   "fused_share": stats.saved / max(stats.candidates, 1),
                   "groups": float(stats.fused_groups),
                   "ratio_paper": stats.candidates / max(stats.candidates - stats.saved, 1)}
        return CompressedPrefix(keys=keys, values=values, evicted=None, bytes_held=int(held),
                                dense_bytes=cache.dense_bytes(), details=details)
