"""A server's own figures from its Prometheus ``/metrics``: polled during a run, reduced to what the
run changed (counter deltas over the run, not since the server started), gauge peaks, last values
and a time series.

- :func:`parse_prometheus` sums every sample of a metric name (labels dropped), except the counters of
  :data:`SPLIT`, kept apart by one label (SGLang's ``sglang:cached_tokens_total`` by
  ``cache_source``: device, host, storage);
- :class:`MetricsScraper` polls in a thread; :meth:`MetricsScraper.stop` returns ``peak <gauge>``,
  ``delta <counter>``, ``last <gauge>``, and keeps ``series``: (unix time, the gauges of
  :data:`SERIES`) per poll;
- :func:`held_tokens`: the KV a server holds, in tokens: DMS's per-head pool in dense-token
  equivalents (``kvsqueeze_dms_held_tokens``, running requests and its prefix cache), else
  kvsqueeze's own gauge, else SGLang's slots in use (``sglang:num_used_tokens``);
- :func:`running_tokens`: the KV the running requests hold: DMS's held tokens less the slots only its
  prefix cache holds (``kvsqueeze_dms_cached_tokens``: freed when the cache evicts them), else as
  :func:`held_tokens` (SGLang counts ``num_used_tokens`` as total - available - evictable: cached
  pages no request locks are not in it). This compares DMS with a dense pool like for like.
  SGLang's gauges update once per scheduled batch and go stale once the server is idle.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request

PEAK_GAUGES = ("sglang:num_used_tokens", "sglang:num_running_reqs", "sglang:token_usage",
               "sglang:num_queue_reqs", "kvsqueeze_kv_tokens_held", "kvsqueeze_dms_held_tokens",
               "kvsqueeze_dms_dense_tokens")
COUNTERS = ("sglang:prompt_tokens_total", "sglang:generation_tokens_total",
            "sglang:num_requests_total", "kvsqueeze_kvtc_pages_stored", "kvsqueeze_kvtc_hits",
            "kvsqueeze_kvtc_misses", "kvsqueeze_kvtc_restore_seconds",
            "kvsqueeze_kvtc_encode_seconds", "kvsqueeze_kv_token_reads_total",
            "kvsqueeze_fusion_pages_checked", "kvsqueeze_fusion_pages_fused",
            "sglang:num_retracted_requests_total", 'sglang:cached_tokens_total{cache_source="device"}',
            'sglang:cached_tokens_total{cache_source="host"}', 'sglang:cached_tokens_total{cache_source="storage"}',
            'sglang:cached_tokens_total{cache_source="total"}')
LAST_GAUGES = ("sglang:max_total_num_tokens", "kvsqueeze_dms_kept_fraction", "kvsqueeze_dms_peak_sequences",
               "kvsqueeze_kvtc_pages_held",
               "kvsqueeze_kvtc_bytes_before", "kvsqueeze_kvtc_bytes_after",
               "kvsqueeze_fusion_pages_saved", "kvsqueeze_fusion_groups")
SERIES = ("kvsqueeze_dms_held_tokens", "kvsqueeze_dms_cached_tokens", "kvsqueeze_kv_tokens_held", "sglang:num_used_tokens",
          "sglang:num_running_reqs", "sglang:num_queue_reqs", "kvsqueeze_fusion_pages_saved")
SPLIT = {"sglang:cached_tokens_total": "cache_source"}
HELD = ("kvsqueeze_dms_held_tokens", "kvsqueeze_kv_tokens_held", "sglang:num_used_tokens")


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of every sample of each metric name (labels dropped, but for :data:`SPLIT`), histograms'
    raw series included."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)", line)
        if not m:
            continue
        try:
            v = float(m.group(3))
        except ValueError:
            continue
        name = m.group(1)
        if name in SPLIT:
            lab = re.search(SPLIT[name] + r'="([^"]*)"', m.group(2) or "")
            if lab:
                name = f'{name}{{{SPLIT[name]}="{lab.group(1)}"}}'
        out[name] = out.get(name, 0.0) + v
    return out


def held_tokens(values: dict[str, float]) -> float | None:
    """The KV a server holds in (dense-)token equivalents, from one scrape (see the module docstring)."""
    for k in HELD:
        if k in values:
            return values[k]
    return None


def running_tokens(values: dict[str, float]) -> float | None:
    """The KV the running requests hold, in (dense-)token equivalents, from one scrape (module docstring)."""
    held = held_tokens(values)
    if held is not None and "kvsqueeze_dms_held_tokens" in values:
        held -= values.get("kvsqueeze_dms_cached_tokens", 0.0)
    return held


def scrape(url: str, timeout: float = 5.0) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as r:
            return parse_prometheus(r.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError, ValueError):
        return None


class MetricsScraper:
    """Polls ``/metrics`` in a thread: peaks of gauges, deltas of counters, last values, a series."""

    def __init__(self, url: str, interval: float | None = 0.5):
        self.url, self.interval = url.rstrip("/"), interval
        self.first: dict[str, float] | None = None
        self.last: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.series: list[tuple[float, dict[str, float]]] = []
        self.polls = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def scrape(self) -> dict[str, float] | None:
        values = scrape(self.url)
        self.errors += values is None
        return values

    def _take(self, values: dict[str, float] | None) -> None:
        if values is None:
            return
        self.polls += 1
        if self.first is None:
            self.first = values
        self.last = values
        self.series.append((time.time(), {k: values[k] for k in SERIES if k in values}))
        for k in PEAK_GAUGES:
            if k in values:
                self.peak[k] = max(self.peak.get(k, float("-inf")), values[k])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._take(self.scrape())
            self._stop.wait(self.interval)

    def start(self) -> "MetricsScraper":
        self._take(self.scrape())
        if self.interval:  # None or 0: the first and last scrape only (no load on the server between)
            self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self._take(self.scrape())
        first = self.first or {}
        out = {"polls": self.polls, "scrape_errors": self.errors}
        out.update({f"peak {k}": v for k, v in self.peak.items()})
        for k in COUNTERS:
            if k in self.last:
                out[f"delta {k}"] = self.last[k] - first.get(k, 0.0)
        for k in LAST_GAUGES:
            if k in self.last:
                out[f"last {k}"] = self.last[k]
        return out


def post(url: str, timeout: float = 300.0) -> int | None:
    """POST with an empty body (``/flush_cache``); the status, or None if the server did not answer."""
    try:
        req = urllib.request.Request(url, data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except (urllib.error.URLError, OSError):
        return None
