"""Block fusion's configuration, its one set of defaults and validators, and which layers decide.

Every user of fusion (the ``fusion`` eval method, the batch evaluation, the SGLang and TensorRT-LLM
adapters, the harness) takes its defaults and checks from here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from kvsqueeze.errors import bad_value

DEFAULT_BLOCK = 16
# The setting docs/fusion.md recommends for serving: per-token similarity at 0.9 fused 1.9x fewer
# pages than radix alone on the pooled near-duplicate workload at KL 1e-4 (whole pages shared).
DEFAULT_THRESHOLD = 0.9
SIMILARITIES = ("block", "token")
DEFAULT_SIMILARITY = "token"
DEFAULT_MAX_CANDIDATES = 64
# How candidates group (kvsqueeze/methods/fusion/grouping.py): "batch", the paper's recursive halving
# of the batch of requests or chunks, or "split", complete linkage around two pivots.
GROUPINGS = ("batch", "split")
DEFAULT_GROUPING = "batch"
# What a prefix's blocks fuse with (the ``fusion`` eval method): "any" other block of the compressible
# middle, or, as the paper's CFF, "chunks": blocks on the page grid, only across the chunks of one
# window of ``window_chunks`` consecutive chunks of ``chunk_tokens`` tokens.
SCOPES = ("any", "chunks")
DEFAULT_SCOPE = "chunks"
DEFAULT_CHUNK_TOKENS = 128
DEFAULT_WINDOW_CHUNKS = 8
NORM_BYTES = 2
INDEX_BYTES = 4


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
            not 0 < threshold <= 1:
        raise bad_value("threshold", threshold, "a cosine similarity in (0, 1]")
    return float(threshold)


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise bad_value("block_size", block_size, "a number of tokens per block >= 1")
    return block_size


def check_similarity(similarity) -> str:
    if similarity not in SIMILARITIES:
        raise bad_value("similarity", similarity, f"one of {', '.join(SIMILARITIES)}")
    return similarity


def check_grouping(grouping) -> str:
    if grouping not in GROUPINGS:
        raise bad_value("grouping", grouping, f"one of {', '.join(GROUPINGS)}")
    return grouping


def check_scope(scope) -> str:
    if scope not in SCOPES:
        raise bad_value("scope", scope, f"one of {', '.join(SCOPES)}")
    return scope


def check_count(name: str, value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_value(name, value, f"{what} >= 1")
    return value


def default_layers(n_layers: int) -> list[int]:
    """All but the first two and the last two layers (the paper's range); a model of 4 layers or
    fewer has no such range, and all its layers decide."""
    return list(range(2, n_layers - 2)) if n_layers > 4 else list(range(n_layers))


def parse_layers(spec, n_layers: int) -> list[int]:
    """``None`` (default range), ``"a-b"`` (inclusive), ``"all"`` or a list of layer indices."""
    if spec is None:
        return default_layers(n_layers)
    if spec == "all":
        return list(range(n_layers))
    if isinstance(spec, str):
        a, dash, b = spec.partition("-")
        try:
            layers = list(range(int(a), int(b) + 1)) if dash else [int(x) for x in spec.split(",")]
        except ValueError:
            raise bad_value("layers", spec, "a range a-b, a comma-separated list, or all")
    else:
        layers = list(spec)
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise bad_value("layers", spec, f"layer indices in 0..{n_layers - 1}")
    return sorted(set(layers))


def check_layers(spec) -> str | list | None:
    """A layer spec's form, before the model's size is known."""
    if spec is None or spec == "all":
        return spec
    parse_layers(spec, 10 ** 6)
    return spec


@dataclass(frozen=True)
class FusionConfig:
    """What a serving engine's fusion needs: the threshold, the similarity, the decision layers (a spec
    for :func:`parse_layers`) and how many live representatives per page index a new page is compared
    with. Carried to an engine's processes as JSON (:meth:`to_json`)."""

    threshold: float = DEFAULT_THRESHOLD
    similarity: str = DEFAULT_SIMILARITY
    layers: str | list | None = None
    max_candidates: int = DEFAULT_MAX_CANDIDATES

    def __post_init__(self):
        object.__setattr__(self, "threshold", check_threshold(self.threshold))
        check_similarity(self.similarity)
        check_layers(self.layers)
        if isinstance(self.max_candidates, bool) or not isinstance(self.max_candidates, int) \
                or self.max_candidates < 1:
            raise bad_value("max_candidates", self.max_candidates, "an integer >= 1")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str, what: str = "fusion config") -> "FusionConfig":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise bad_value(what, raw, f"a JSON object ({e})")
        if not isinstance(data, dict):
            raise bad_value(what, raw, "a JSON object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise bad_value(what, raw, f"only the keys {', '.join(cls.__dataclass_fields__)}")
        return cls(**data)
