"""Latency SLOs: their spelling, each request's verdict, goodput and attainment with an interval.

An SLO is a bound on per-request latencies, ``--slo ttft=2s,tpot=150ms[,e2e=20s]`` (units ``s`` or
``ms``; a bare number is seconds):

- ``ttft``: time to first token; ``tpot``: time per output token after the first,
  ``(e2e - ttft) / (output tokens - 1)``; ``e2e``: request sent to last token
  (definitions in ``docs/metrics.md``).

A request *meets* the SLO when it succeeded and every bound holds (``<=``). A one-token reply has no
time per output token and meets a TPOT bound, as in SGLang's goodput. A failed request meets none:
it counts against attainment (SGLang's and vLLM's goodput leave failures out of the numerator only;
so does this, and both divide by every request sent).

Per point: **goodput** = requests that met the SLO / the point's duration (requests/s);
**attainment** = requests that met it / requests sent, with a 95% Wilson interval (each request one
Bernoulli draw; requests of one point are treated as independent, which load-induced correlation
makes optimistic). A point *meets the target* when its attainment is at least the target (default
0.95), the decision vLLM's, AIPerf's and GuideLLM's capacity searches make on the point estimate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from kvsqueeze.errors import bad_value
from kvsqueeze.harness.stats import wilson

METRICS = ("ttft", "tpot", "e2e")
UNITS = {"s": 1.0, "ms": 1e-3}
DEFAULT_TARGET = 0.95


@dataclass(frozen=True)
class SLO:
    """Bounds in seconds per metric, and the share of requests that must meet all of them."""

    bounds: dict[str, float] = field(default_factory=dict)
    target: float = DEFAULT_TARGET

    def __post_init__(self):
        if not self.bounds:
            raise bad_value("slo", self.bounds, f"at least one bound, of {', '.join(METRICS)}")
        for k, v in self.bounds.items():
            if k not in METRICS:
                raise bad_value("slo", k, f"a metric among {', '.join(METRICS)}")
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise bad_value(f"slo {k}", v, "a bound > 0 seconds")
        if not (isinstance(self.target, (int, float)) and 0 < self.target <= 1):
            raise bad_value("attainment", self.target, "a share of requests in (0, 1], e.g. 0.95")

    @property
    def label(self) -> str:
        return ",".join(f"{k}={_fmt(v)}" for k, v in self.bounds.items()) + f" @ {self.target:.0%}"

    def to_dict(self) -> dict:
        return {"bounds_s": dict(self.bounds), "target": self.target, "label": self.label}

    @classmethod
    def from_dict(cls, d: dict) -> "SLO":
        return cls(dict(d["bounds_s"]), d["target"])

    def verdict(self, ok: bool, ttft: float | None, tpot: float | None, e2e: float | None) -> dict[str, bool]:
        """Per metric, whether this request met its bound (all False for a failed request)."""
        got = {"ttft": ttft, "tpot": tpot, "e2e": e2e}
        out = {}
        for k, bound in self.bounds.items():
            v = got[k]
            if not ok:
                out[k] = False
            elif v is None or v != v:  # a one-token reply has no TPOT: met (SGLang's rule)
                out[k] = k == "tpot"
            else:
                out[k] = v <= bound
        return out

    def met(self, ok: bool, ttft: float | None, tpot: float | None, e2e: float | None) -> bool:
        return ok and all(self.verdict(ok, ttft, tpot, e2e).values())


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def parse_slo(text: str, target: float = DEFAULT_TARGET) -> SLO:
    """``ttft=2s,tpot=150ms,e2e=20s`` -> SLO (seconds)."""
    bounds: dict[str, float] = {}
    for part in str(text or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq:
            raise bad_value("slo", part, "METRIC=VALUE[s|ms] items, e.g. ttft=2s,tpot=150ms")
        if key not in METRICS:
            raise bad_value("slo", key, f"a metric among {', '.join(METRICS)}")
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-z]*)\s*", value)
        if not m or (m.group(2) and m.group(2) not in UNITS):
            raise bad_value(f"slo {key}", value, f"a number with a unit among {', '.join(UNITS)} (e.g. 150ms)")
        if key in bounds:
            raise bad_value("slo", key, "each metric once")
        bounds[key] = float(m.group(1)) * UNITS[m.group(2) or "s"]
    return SLO(bounds, target)


@dataclass(frozen=True)
class Attainment:
    """One point's requests against an SLO."""

    sent: int  # requests counted (measured, failed included)
    met: int
    failed: int
    duration_s: float
    met_by_metric: dict[str, int]
    target: float

    @property
    def attainment(self) -> float:
        return self.met / self.sent if self.sent else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.met, self.sent)

    @property
    def goodput(self) -> float:
        """Requests per second that met the SLO."""
        return self.met / self.duration_s if self.duration_s > 0 else float("nan")

    @property
    def meets_target(self) -> bool:
        return self.sent > 0 and self.attainment >= self.target

    def as_dict(self) -> dict:
        lo, hi = self.interval
        out = {"slo_sent": self.sent, "slo_met": self.met, "slo_failed": self.failed,
               "attainment": self.attainment, "attainment_lo": lo, "attainment_hi": hi,
               "goodput_rps": self.goodput, "meets_target": self.meets_target}
        out.update({f"attainment_{k}": v / self.sent if self.sent else float("nan")
                    for k, v in self.met_by_metric.items()})
        return out


def attainment(slo: SLO, requests: list[dict], duration_s: float) -> Attainment:
    """``requests``: dicts with ``ok`` (bool or 0/1) and ``ttft_s``, ``tpot_s``, ``e2e_s`` (None or
    NaN where absent); ``duration_s``: the span goodput divides by."""
    met = failed = 0
    by_metric = dict.fromkeys(slo.bounds, 0)
    for r in requests:
        ok = bool(int(r.get("ok") or 0))
        failed += not ok
        v = slo.verdict(ok, _num(r.get("ttft_s")), _num(r.get("tpot_s")), _num(r.get("e2e_s")))
        for k, passed in v.items():
            by_metric[k] += passed
        met += ok and all(v.values())
    return Attainment(len(requests), met, failed, float(duration_s), by_metric, slo.target)


def _num(v) -> float | None:
    if v is None or v == "":
        return None
    v = float(v)
    return None if v != v else v
