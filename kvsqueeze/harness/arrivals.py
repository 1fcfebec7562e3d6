"""Load shapes: when each request (or conversation) of a campaign point is sent.

Open loop (the arrivals do not wait for answers): request ``i`` is due ``offsets[i]`` seconds after
the point starts, ``offsets[0] = 0`` and the gaps between them drawn from

- ``constant``: every gap ``1 / rate``;
- ``poisson``: exponential gaps of mean ``1 / rate`` (a Poisson process);
- ``gamma``: gamma gaps of shape ``burstiness`` and scale ``1 / (rate * burstiness)``: mean ``1 / rate``
  at any burstiness, coefficient of variation ``1 / sqrt(burstiness)``; burstiness 1 is Poisson,
  below 1 burstier, above 1 smoother. This is vLLM's ``--burstiness``.

The gaps are drawn up front from a seeded generator, so a point's schedule is the same on every run
and can be split between load generators: each sends the requests whose index it owns and none
twice. Unlike SGLang's and vLLM's clients, which sleep a freshly drawn gap after each send (a late send
delays all later ones), the schedule here is absolute: a late send does not move the next one, and
each request's lag (actual minus scheduled send) is recorded.

Closed loop (``closed``): ``concurrency`` clients, each sending its next request (or conversation) as
soon as its last one ended.

Spelled ``KIND`` with the value per point given apart (``--load poisson --rates 1,2,4``) or
``KIND:VALUE[:BURSTINESS]`` for one point (``poisson:2``, ``gamma:2:0.5``, ``closed:8``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from kvsqueeze.errors import bad_value

OPEN = ("constant", "poisson", "gamma")
KINDS = OPEN + ("closed",)


@dataclass(frozen=True)
class LoadShape:
    """``kind`` and, for gamma arrivals, ``burstiness`` (the value per point is given apart)."""

    kind: str = "poisson"
    burstiness: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise bad_value("load", self.kind, f"one of {', '.join(KINDS)}")
        if not (isinstance(self.burstiness, (int, float)) and math.isfinite(self.burstiness)
                and self.burstiness > 0):
            raise bad_value("burstiness", self.burstiness, "a number > 0 (1: Poisson, below: burstier)")
        if self.kind != "gamma" and self.burstiness != 1.0:
            raise bad_value("burstiness", self.burstiness, "1 unless the load is gamma")

    @property
    def open_loop(self) -> bool:
        return self.kind in OPEN

    @property
    def unit(self) -> str:
        """What a point's value counts."""
        return "requests/s" if self.open_loop else "concurrent clients"

    @property
    def label(self) -> str:
        return f"gamma(burstiness={self.burstiness:g})" if self.kind == "gamma" else self.kind

    def check_value(self, value: float, field: str = "rate") -> float:
        if self.open_loop:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise bad_value(field, value, "a request rate > 0 (requests per second)")
            return float(value)
        if not (isinstance(value, (int, float)) and value == int(value) and value >= 1):
            raise bad_value(field, value, "a number of concurrent clients >= 1 (a whole number)")
        return int(value)


def parse_load(text: str) -> tuple[LoadShape, float | None]:
    """``poisson`` -> (shape, None); ``poisson:2`` -> (shape, 2.0); ``gamma:2:0.5``; ``closed:8``."""
    parts = (text or "").strip().split(":")
    kind = parts[0]
    if kind not in KINDS:
        raise bad_value("load", text, f"KIND[:VALUE[:BURSTINESS]] with KIND one of {', '.join(KINDS)}")
    if len(parts) > (3 if kind == "gamma" else 2):
        raise bad_value("load", text, "gamma:RATE:BURSTINESS, KIND:RATE or closed:CONCURRENCY")
    burst = 1.0
    if kind == "gamma" and len(parts) == 3:
        burst = _number("burstiness", parts[2])
    shape = LoadShape(kind, burst)
    value = shape.check_value(_number("load", parts[1])) if len(parts) > 1 and parts[1] else None
    return shape, value


def _number(field: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise bad_value(field, text, "a number") from None


def parse_values(text: str, shape: LoadShape, field: str) -> list[float]:
    """``--rates 0.5,1,2`` or ``--concurrency 1,4,8``: the points' values, each checked."""
    values = [shape.check_value(_number(field, v.strip()), field) for v in str(text).split(",") if v.strip()]
    if not values:
        raise bad_value(field, text, "at least one value")
    return list(dict.fromkeys(values))


def intervals(shape: LoadShape, rate: float, count: int, seed: int = 0) -> list[float]:
    """``count`` gaps between consecutive sends of an open-loop point at ``rate`` requests/s."""
    rate = shape.check_value(rate)
    if not shape.open_loop:
        raise bad_value("load", shape.kind, "an open-loop shape (constant, poisson, gamma) for a schedule")
    rng = random.Random(seed)
    if shape.kind == "constant":
        return [1.0 / rate] * count
    if shape.kind == "poisson":
        return [rng.expovariate(rate) for _ in range(count)]
    k = shape.burstiness
    return [rng.gammavariate(k, 1.0 / (rate * k)) for _ in range(count)]


def schedule(shape: LoadShape, rate: float, count: int, seed: int = 0) -> list[float]:
    """Send offsets (seconds after the point starts) of ``count`` requests: the first at 0."""
    if count < 1:
        return []
    out = [0.0]
    for gap in intervals(shape, rate, count - 1, seed):
        out.append(out[-1] + gap)
    return out


def owned(index: int, worker: int, workers: int) -> bool:
    """Whether load generator ``worker`` (of ``workers``) sends request ``index`` of a schedule:
    round robin, so each request is sent by exactly one and each gets an even share of the load."""
    return index % workers == worker
