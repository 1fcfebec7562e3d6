"""A campaign point's figures from its request rows and its server's scrapes: the one place they are
defined (the campaign runner, the report, the soak and the benchmark scripts call these).

Which requests count: rows of phase ``measured`` (due after the warm-up). Failed requests count as
sent (and against attainment) but give no latencies.

- **duration**: the first measured request's send to the last measured request's end, as
  vLLM's and SGLang's clients measure their benchmark duration (theirs include every request);
- **requests/s**, **output tokens/s**: completed measured requests and their output tokens over the
  duration; **offered rate**: measured requests over the span of their scheduled sends (open loop);
- **TTFT**, **E2E**, **TPOT** (``(e2e - ttft) / (output tokens - 1)`` per request, requests of two or
  more tokens): mean, p50, p90, p99 over completed requests;
- **ITL**: every gap between consecutive chunks of every completed request, pooled (what vLLM's and
  SGLang's clients call ITL); mean, p50, p90, p99;
- **lag**: actual minus scheduled send time of each request (the client keeping its schedule); p50,
  p99, max;
- **prefix hits**: prompt tokens served from the prefix cache, in total and by source (device, host,
  storage: SGLang's ``cached_tokens_details``), per request;
- **KV held**: the KV the server's running requests hold (:func:`kvsqueeze.harness.scrape.running_tokens`:
  DMS's per-head pool without the slots only its prefix cache keeps, SGLang's used slots otherwise) in
  bytes over the point (each scrape x ``bytes_per_token``), its peak and mean, and its integral over
  the point divided by the measured requests (byte-seconds per request: memory x time a request costs).

Percentiles are numpy's linear interpolation (as vLLM's and SGLang's clients use).
"""

from __future__ import annotations

import json
import math

import numpy as np

from kvsqueeze.harness.scrape import running_tokens
from kvsqueeze.harness.slo import SLO, attainment

PCTS = (50, 90, 99)


def _f(v) -> float | None:
    if v is None or v == "":
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def summary(values: list[float], name: str) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    out = {f"{name}_mean": float(v.mean()) if v.size else float("nan")}
    for p in PCTS:
        out[f"{name}_p{p}"] = float(np.percentile(v, p)) if v.size else float("nan")
    return out


def measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("phase", "measured") == "measured"]


def duration(rows: list[dict]) -> float:
    """First measured send to last measured end (seconds); 0 without a completed request."""
    sends = [_f(r.get("sent_s")) for r in rows]
    sends = [s for s in sends if s is not None]
    ends = [_f(r["sent_s"]) + _f(r["e2e_s"]) for r in rows
            if int(r.get("ok") or 0) and _f(r.get("sent_s")) is not None and _f(r.get("e2e_s")) is not None]
    return max(ends) - min(sends) if ends and sends else 0.0


def point_figures(rows: list[dict], slo: SLO | None = None) -> dict:
    """Client-side figures of one point (module docstring)."""
    m = measured(rows)
    ok = [r for r in m if int(r.get("ok") or 0)]
    dur = duration(m)
    out = {"requests": len(m), "completed": len(ok), "failed": len(m) - len(ok),
           "warmup_requests": len(rows) - len(m), "duration_s": dur}
    sched = [_f(r.get("scheduled_s")) for r in m]
    sched = [s for s in sched if s is not None]
    span = (max(sched) - min(sched)) if len(sched) > 1 else 0.0
    out["offered_rps"] = (len(sched) - 1) / span if span > 0 else float("nan")
    out["requests_per_s"] = len(ok) / dur if dur > 0 else float("nan")
    tokens = sum(_f(r.get("output_tokens")) or 0 for r in ok)
    out["output_tokens"] = tokens
    out["output_tok_s"] = tokens / dur if dur > 0 else float("nan")
    out.update(summary([_f(r.get("ttft_s")) for r in ok], "ttft_s"))
    out.update(summary([_f(r.get("tpot_s")) for r in ok], "tpot_s"))
    out.update(summary([_f(r.get("e2e_s")) for r in ok], "e2e_s"))
    gaps = [g for r in ok for g in json.loads(r.get("itl_s") or "[]")]
    out.update(summary(gaps, "itl_s"))
    lags = [_f(r.get("lag_s")) for r in m]
    lags = [x for x in lags if x is not None]
    out.update({"lag_p50_s": float(np.percentile(lags, 50)) if lags else float("nan"),
                "lag_p99_s": float(np.percentile(lags, 99)) if lags else float("nan"),
                "lag_max_s": max(lags) if lags else float("nan")})
    for src in ("tokens", "device", "host", "storage"):
        col = "cached_tokens" if src == "tokens" else f"cached_{src}"
        vals = [_f(r.get(col)) for r in ok]
        vals = [v for v in vals if v is not None]
        out[f"cached_{src}_per_request"] = sum(vals) / len(ok) if vals and ok else float("nan")
    prompt = [_f(r.get("prompt_tokens")) for r in ok]
    prompt = [p for p in prompt if p is not None]
    out["prompt_tokens_mean"] = float(np.mean(prompt)) if prompt else float("nan")
    returning = [r for r in ok if int(r.get("turn") or 0) > 0]
    out["returning_requests"] = len(returning)
    out.update({k.replace("ttft_s", "ttft_returning_s"): v
                for k, v in summary([_f(r.get("ttft_s")) for r in returning], "ttft_s").items()})
    scored = [r for r in ok if r.get("correct") not in (None, "")]
    out["scored"] = len(scored)
    out["accuracy"] = (sum(int(float(r["correct"])) for r in scored) / len(scored)) if scored else float("nan")
    if slo is not None:
        out.update(attainment(slo, m, dur).as_dict())
    return out


def kv_figures(series: list[tuple[float, dict]], bytes_per_token: float, requests: int,
               t0: float | None = None, t1: float | None = None) -> dict:
    """Held KV over the point from the scrapes (unix time, values), in bytes: peak, time-weighted
    mean, and the integral (trapezoid) divided by ``requests``; ``t0``/``t1`` clip the window."""
    pts = [(t, running_tokens(v)) for t, v in series]
    pts = [(t, h * bytes_per_token) for t, h in pts if h is not None and (t0 is None or t >= t0)
           and (t1 is None or t <= t1)]
    if len(pts) < 2:
        return {"kv_held_peak_bytes": pts[0][1] if pts else float("nan"), "kv_held_mean_bytes": float("nan"),
                "kv_byte_s_per_request": float("nan"), "kv_samples": len(pts)}
    ts = np.array([p[0] for p in pts])
    hs = np.array([p[1] for p in pts])
    area = float(np.sum((hs[1:] + hs[:-1]) / 2 * np.diff(ts)))
    span = float(ts[-1] - ts[0])
    return {"kv_held_peak_bytes": float(hs.max()), "kv_held_mean_bytes": area / span if span > 0 else float("nan"),
            "kv_byte_s_per_request": area / requests if requests else float("nan"), "kv_samples": len(pts)}


def server_figures(server: dict) -> dict:
    """The point's server-side counters and gauges (``MetricsScraper.stop()``), named for the report."""
    def d(k):
        return server.get(f"delta {k}", float("nan"))

    src = {s: d(f'sglang:cached_tokens_total{{cache_source="{s}"}}') for s in ("device", "host", "storage")}
    return {"server_cached_device": src["device"], "server_cached_host": src["host"],
            "server_cached_storage": src["storage"],
            "store_hits": d("kvsqueeze_kvtc_hits"), "store_misses": d("kvsqueeze_kvtc_misses"),
            "store_restore_s": d("kvsqueeze_kvtc_restore_seconds"), "store_encode_s": d("kvsqueeze_kvtc_encode_seconds"),
            "store_pages_written": d("kvsqueeze_kvtc_pages_stored"),
            "fused_pages": d("kvsqueeze_fusion_pages_fused"), "fusion_pages_checked": d("kvsqueeze_fusion_pages_checked"),
            # SGLang exports the retraction counter from its first retraction on: none yet is 0
            "retractions": server.get("delta sglang:num_retracted_requests_total",
                                      0.0 if "peak sglang:num_running_reqs" in server else float("nan")),
            "queue_peak": server.get("peak sglang:num_queue_reqs", float("nan")),
            "running_peak": server.get("peak sglang:num_running_reqs", float("nan")),
            "budget_tokens": server.get("last sglang:max_total_num_tokens", float("nan"))}
