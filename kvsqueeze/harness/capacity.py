"""The capacity search: the highest load (request rate, or concurrency for a closed loop) at which a
server still meets an SLO's attainment target.

``measure(value) -> bool`` runs one point and says whether it met the target. The search:

1. from ``start``, double while points pass (up to ``ceiling``); if ``start`` fails, halve until one
   passes (down to ``floor``);
2. bisect between the highest passing and the lowest failing value until they are within
   ``tolerance`` of each other (relative: ``(fail - pass) / pass <= tolerance``; for concurrency,
   whole numbers, until they are adjacent) or ``max_points`` points have run.

The result is the highest passing value (the capacity) and the lowest failing one: the true
threshold lies between them if attainment falls with load. A point that passes above one that failed
(noise near the threshold) is kept in the record and the bracket is taken from the passing value
below the lowest failure, so the capacity is never one that a lower load contradicts.

This is the search of AIPerf's and GuideLLM's "max goodput under SLO" recipes in its simplest form
(doubling, then bisection); it assumes attainment falls with load, as it does for a server whose
latency rises with its queue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from kvsqueeze.errors import bad_value


@dataclass
class SearchResult:
    capacity: float | None  # highest value that met the target (None: even the floor failed)
    lowest_failing: float | None  # lowest value that failed (None: even the ceiling passed)
    points: list[tuple[float, bool]] = field(default_factory=list)  # in the order they ran
    stopped: str = ""  # why the search ended

    def as_dict(self) -> dict:
        return {"capacity": self.capacity, "lowest_failing": self.lowest_failing,
                "points": [{"value": v, "passed": p} for v, p in self.points], "stopped": self.stopped}


def search(measure: Callable[[float], bool], start: float, tolerance: float = 0.1, integer: bool = False,
           floor: float | None = None, ceiling: float | None = None, max_points: int = 12) -> SearchResult:
    if not (start > 0 and math.isfinite(start)):
        raise bad_value("search start", start, "a load > 0")
    if not 0 < tolerance < 1:
        raise bad_value("tolerance", tolerance, "a relative bracket width in (0, 1), e.g. 0.1")
    if max_points < 2:
        raise bad_value("max_points", max_points, "at least 2 points")
    floor = floor if floor is not None else (1 if integer else start / 64)
    ceiling = ceiling if ceiling is not None else start * 1024
    res = SearchResult(None, None)
    seen: dict[float, bool] = {}

    def run(v: float) -> bool:
        v = _snap(v, integer)
        if v not in seen:
            seen[v] = bool(measure(v))
            res.points.append((v, seen[v]))
        return seen[v]

    def bracket_now() -> tuple[float | None, float | None]:
        return bracket(seen.items())

    v = _snap(start, integer)
    if run(v):
        while len(seen) < max_points:
            nxt = _snap(min(v * 2, ceiling), integer)
            if nxt <= v:
                res.stopped = f"passed at the ceiling {ceiling:g}"
                break
            v = nxt
            if not run(v):
                break
    else:
        while len(seen) < max_points:
            nxt = _snap(max(v / 2, floor), integer)
            if nxt >= v:
                res.stopped = f"failed at the floor {floor:g}"
                break
            v = nxt
            if run(v):
                break
    while not res.stopped:
        ok_v, fail_v = bracket_now()
        if ok_v is None or fail_v is None:
            res.stopped = res.stopped or "no bracket"
            break
        if _narrow(ok_v, fail_v, tolerance, integer):
            res.stopped = f"bracket within {'one' if integer else f'{tolerance:.0%}'}"
            break
        if len(seen) >= max_points:
            res.stopped = f"{max_points} points run"
            break
        mid = _snap((ok_v + fail_v) / 2, integer)
        if mid in seen:  # a whole-number bracket that cannot narrow further
            res.stopped = "bracket cannot narrow"
            break
        run(mid)
    res.capacity, res.lowest_failing = bracket_now()
    return res


def bracket(points) -> tuple[float | None, float | None]:
    """(highest passing value below the lowest failing one, lowest failing value) of ``(value,
    passed)`` pairs: the capacity and the load that showed it is exceeded (None where there is none)."""
    points = list(points)
    fails = [v for v, ok in points if not ok]
    lo_fail = min(fails) if fails else None
    passes = [v for v, ok in points if ok and (lo_fail is None or v < lo_fail)]
    return (max(passes) if passes else None), lo_fail


def _snap(v: float, integer: bool) -> float:
    return float(max(1, round(v))) if integer else float(f"{v:.4g}")


def _narrow(lo: float, hi: float, tolerance: float, integer: bool) -> bool:
    return hi - lo <= 1 if integer else (hi - lo) / lo <= tolerance
