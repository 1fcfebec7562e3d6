"""The DMS configuration and the files of a kvsqueeze DMS checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from kvsqueeze.errors import KvsqueezeError, bad_value

GATE_KINDS = ("projection", "query_neuron")
GRANULARITIES = ("head", "layer")
CONFIG_FILE = "dms_config.json"
GATES_FILE = "dms_gates.safetensors"


@dataclass(frozen=True)
class DMSConfig:
    """``window``: tokens a flagged token stays attendable; ``sinks``: first tokens never evicted (0 =
    the paper exactly); ``gate``: ``projection`` (a new zero-initialised ``Linear(hidden, n_kv_heads)``
    on an RMS norm of the layer input) or ``query_neuron`` (the last neuron of the first query head of
    each GQA group, after q-norm and before RoPE, then zeroed); ``granularity``: one decision per KV
    head or per layer; ``tau``: the training relaxation's temperature; the gate logit is
    ``raw * logit_scale + logit_bias`` (starts at "keep"); ``evict``: False turns eviction off (every
    decision "keep"; a released checkpoint's ``dms_disable_eviction``)."""

    window: int = 64
    sinks: int = 4
    gate: str = "projection"
    granularity: str = "head"
    target_ratio: float = 4.0
    tau: float = 0.1
    logit_scale: float = 100.0
    logit_bias: float = -5.0
    evict: bool = True

    def __post_init__(self):
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise bad_value("window", self.window, "an integer number of tokens >= 1")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise bad_value("sinks", self.sinks, "a number of tokens >= 0")
        if self.gate not in GATE_KINDS:
            raise bad_value("gate", self.gate, f"one of {', '.join(GATE_KINDS)}")
        if self.granularity not in GRANULARITIES:
            raise bad_value("granularity", self.granularity, f"one of {', '.join(GRANULARITIES)}")
        if not self.target_ratio >= 1:
            raise bad_value("target_ratio", self.target_ratio, "a compression ratio >= 1")
        if not self.tau > 0:
            raise bad_value("tau", self.tau, "a temperature > 0")
        if not isinstance(self.evict, bool):
            raise bad_value("evict", self.evict, "true or false")

    @property
    def per_layer(self) -> bool:
        return self.granularity == "layer"

    def save(self, directory: Path) -> None:
        (Path(directory) / CONFIG_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "DMSConfig":
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise KvsqueezeError(f"checkpoint={str(directory)!r}: {CONFIG_FILE} is missing; expected a "
                                 "DMS checkpoint written by `kvsqueeze dms train`")
        try:
            return cls(**json.loads(path.read_text()))
        except (TypeError, ValueError) as exc:
            raise KvsqueezeError(f"{path}: not a valid DMS config ({exc})") from exc
