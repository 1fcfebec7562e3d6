"""kvsqueeze's gauges on SGLang's Prometheus ``/metrics`` (present with ``--enable-metrics``)."""

from __future__ import annotations

import os

_REGISTERED: dict[str, object] = {}


def gauges(metrics: dict[str, tuple[str, str]]) -> dict:
    """``{stat: Gauge}`` for ``metrics = {stat: (name, help)}`` in SGLang's multiprocess registry
    (``livesum``: one scheduler per rank adds up), created once per process; ``{}`` without metrics."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return {}
    try:
        from prometheus_client import Gauge
    except ImportError:
        return {}
    out = {}
    for key, (name, doc) in metrics.items():
        if name not in _REGISTERED:
            _REGISTERED[name] = Gauge(name, doc, multiprocess_mode="livesum")
        out[key] = _REGISTERED[name]
    return out
