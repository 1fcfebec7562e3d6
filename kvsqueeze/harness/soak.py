"""A soak: one server held at a steady share of its measured capacity for a long time, and whether it
drifts.

One open-loop campaign point (:func:`kvsqueeze.harness.campaign.run_point`) of ``minutes`` at
``rate`` requests/s (given, or ``fraction`` x the method's capacity read from a campaign folder),
while the server's process memory (RSS of its whole process group, every ``memory_every`` seconds)
and its ``/metrics`` are recorded. Then, with nothing running and its prefix cache flushed, the KV it
still holds (:func:`kvsqueeze.harness.faults.idle_kv`: 0 expected).

What it reports, by windows of equal length (``windows``) over the soak:

- per window: requests, TTFT/TPOT/E2E p50 and p99, SLO attainment, KV held, RSS;
- **latency drift**: the median TTFT and TPOT of the last third of the requests over the first third's,
  with a 95% percentile-bootstrap interval (requests resampled within each third; fixed seed); drift is
  flagged when the interval excludes 1 and the change is more than ``DRIFT`` (10%);
- **memory growth**: the mean RSS of the last third of the samples over the first third's (after the
  first window: start-up allocations are not growth), and the least-squares slope in MiB per hour;
  flagged above ``MEMORY_GROWTH`` (5%);
- **KV once idle**: flagged if not 0.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvsqueeze.errors import bad_value
from kvsqueeze.harness import measure
from kvsqueeze.harness.slo import SLO

DRIFT = 0.10
MEMORY_GROWTH = 0.05
BOOTSTRAP = 2000


class MemorySampler:
    """RSS of a process and all its descendants, every ``every`` seconds, in a thread."""

    def __init__(self, pid: int | None, every: float = 10.0):
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []  # (unix time, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def rss(self) -> float | None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return None
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return float(total)

    def _loop(self) -> None:
        while not self._stop.is_set():
            v = self.rss()
            if v is not None:
                self.samples.append((time.time(), v))
            self._stop.wait(self.every)

    def start(self) -> "MemorySampler":
        if self.pid:
            self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        return self.samples


def median_ratio(first: list[float], last: list[float], seed: int = 0) -> tuple[float, float, float]:
    """median(last) / median(first) with a 95% percentile-bootstrap interval (each group resampled
    on its own)."""
    a, b = np.asarray(first, float), np.asarray(last, float)
    if a.size == 0 or b.size == 0 or np.median(a) <= 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    ra = np.median(a[rng.integers(0, a.size, (BOOTSTRAP, a.size))], axis=1)
    rb = np.median(b[rng.integers(0, b.size, (BOOTSTRAP, b.size))], axis=1)
    ratios = rb / np.where(ra > 0, ra, np.nan)
    lo, hi = np.nanquantile(ratios, [0.025, 0.975])
    return float(np.median(b) / np.median(a)), float(lo), float(hi)


def thirds(values: list) -> tuple[list, list]:
    k = len(values) // 3
    return values[:k], values[len(values) - k:] if k else []


def analyse(rows: list[dict], memory: list[tuple[float, float]], series: list, duration_s: float, windows: int,
            slo: SLO | None, bytes_per_token: float, idle_kv: float | None, t0_unix: float) -> dict:
    """The soak's verdicts and per-window figures (module docstring)."""
    ok = sorted((r for r in measure.measured(rows) if int(r.get("ok") or 0)), key=lambda r: float(r["sent_s"]))
    sent = [float(r["sent_s"]) for r in rows if r.get("sent_s") not in (None, "")]
    span = max([duration_s] + [x + 1e-6 for x in sent])  # a Poisson schedule may end past the nominal length
    width = span / windows
    per_window = []
    for w in range(windows):
        lo, hi = w * width, (w + 1) * width
        mine = [r for r in rows if r.get("sent_s") not in (None, "") and lo <= float(r["sent_s"]) < hi]
        f = measure.point_figures(mine, slo) if mine else {}
        mem = [v for t, v in memory if lo <= t - t0_unix < hi]
        kv = measure.kv_figures(series, bytes_per_token, len(mine), t0_unix + lo, t0_unix + hi)
        per_window.append({"window": w, "from_s": lo, "to_s": hi, "requests": len(mine),
                           "failed": f.get("failed", 0), "ttft_p50_s": f.get("ttft_s_p50"),
                           "ttft_p99_s": f.get("ttft_s_p99"), "tpot_p50_s": f.get("tpot_s_p50"),
                           "tpot_p99_s": f.get("tpot_s_p99"), "e2e_p50_s": f.get("e2e_s_p50"),
                           "attainment": f.get("attainment"), "kv_held_mean_mib": kv["kv_held_mean_bytes"] / 2**20,
                           "rss_mib": float(np.mean(mem)) / 2**20 if mem else float("nan")})
    out = {"windows": per_window}
    for metric in ("ttft_s", "tpot_s"):
        vals = [float(r[metric]) for r in ok if r.get(metric) not in (None, "")]
        first, last = thirds(vals)
        ratio, lo, hi = median_ratio(first, last)
        drifted = bool(ratio == ratio and (lo > 1 or hi < 1) and abs(ratio - 1) > DRIFT)
        out[f"{metric}_drift"] = {"ratio": ratio, "lo": lo, "hi": hi, "first_n": len(first), "last_n": len(last),
                                  "flagged": drifted}
    steady = [(t, v) for t, v in memory if t - t0_unix >= width]  # after the first window
    mf, ml = thirds([v for _, v in steady])
    growth = float(np.mean(ml) / np.mean(mf) - 1) if mf and ml else float("nan")
    slope = float("nan")
    if len(steady) >= 3:
        ts = np.array([t for t, _ in steady]) - steady[0][0]
        slope = float(np.polyfit(ts / 3600, np.array([v for _, v in steady]) / 2**20, 1)[0])
    out["memory"] = {"samples": len(memory), "first_mib": memory[0][1] / 2**20 if memory else float("nan"),
                     "last_mib": memory[-1][1] / 2**20 if memory else float("nan"), "growth": growth,
                     "slope_mib_per_hour": slope, "flagged": bool(growth == growth and growth > MEMORY_GROWTH)}
    out["idle_kv_tokens"] = idle_kv
    out["idle_kv_flagged"] = idle_kv is None or idle_kv > 0
    f = measure.point_figures(rows, slo)
    out["overall"] = {k: f.get(k) for k in ("requests", "completed", "failed", "requests_per_s", "ttft_s_p50",
                                            "ttft_s_p99", "tpot_s_p50", "tpot_s_p99", "attainment", "lag_p99_s")}
    return out


@dataclass
class SoakSpec:
    method: object  # ServerSpec
    workload: object  # Workload
    out_dir: Path
    rate: float | None = None
    capacity_from: str | None = None  # a campaign folder with this method's capacity
    fraction: float = 0.7
    minutes: float = 20.0
    windows: int = 10
    slo: SLO | None = None
    url: str | None = None
    server_pid: int | None = None  # with url: the server's process, for its memory
    model: str | None = None
    endpoint: str = "generate"
    budget_tokens: int | None = 8192
    seed: int = 0
    memory_every: float = 10.0
    server_args: list[str] = field(default_factory=list)
    calibration: str | None = None

    def __post_init__(self):
        if (self.rate is None) == (self.capacity_from is None):
            raise bad_value("rate", self.rate, "either --rate or --capacity-from CAMPAIGN (with --fraction)")
        if self.rate is not None and not self.rate > 0:
            raise bad_value("rate", self.rate, "a request rate > 0 (requests per second)")
        if not 0 < self.fraction <= 1.5:
            raise bad_value("fraction", self.fraction, "a share of the capacity in (0, 1.5]")
        if not self.minutes > 0:
            raise bad_value("minutes", self.minutes, "a soak length > 0 minutes")
        if not 2 <= self.windows <= 1000:
            raise bad_value("windows", self.windows, "between 2 and 1000 windows")

    def resolve_rate(self) -> tuple[float, str]:
        if self.rate is not None:
            return float(self.rate), "given"
        from kvsqueeze.harness import campaign_report

        _, _, cap = campaign_report.summarize(Path(self.capacity_from))
        label = self.method.label
        mine = [c for c in cap if c["method"] == label and c["workload"] == self.workload.spec]
        if not mine or not mine[0]["capacity"]:
            have = ", ".join(f"{c['method']} on {c['workload']}" for c in cap if c["capacity"]) or "no capacity for any method"
            raise bad_value("capacity-from", self.capacity_from, f"a campaign with a capacity for {label} on "
                            f"{self.workload.spec} (it has: {have})")
        c = float(mine[0]["capacity"])
        return self.fraction * c, f"{self.fraction:g} x capacity {c:g} from {self.capacity_from}"


def run_soak(spec: SoakSpec, log=print) -> Path:
    """Run the soak and write ``soak.json``, ``report.md`` and ``plots/soak.png`` in ``spec.out_dir``."""
    import sys

    from transformers import AutoConfig, AutoTokenizer

    from kvsqueeze.harness import faults
    from kvsqueeze.harness.arrivals import LoadShape, schedule
    from kvsqueeze.harness.campaign import run_point
    from kvsqueeze.harness.servers import (kv_bytes_per_token, kvtc_calibration, model_dims, server_dtype,
                                           start_server)
    from kvsqueeze.harness.traffic import PointPlan, read_rows
    from kvsqueeze.harness.workloads import WorkloadContext
    from kvsqueeze.model import resolve_model

    out = Path(spec.out_dir)
    if out.exists() and any(out.iterdir()):
        raise bad_value("out", str(out), "a new or empty directory for this soak")
    rate, why = spec.resolve_rate()
    duration = spec.minutes * 60
    model_path = resolve_model(spec.model)
    tok = AutoTokenizer.from_pretrained(model_path)
    limit = int(getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", 0) or 2048)
    count = max(2, int(np.ceil(rate * duration)))
    convs = spec.workload.conversations(count, WorkloadContext(tok, min(limit, spec.budget_tokens or limit), spec.seed))
    dims = model_dims(model_path)
    bytes_per_token = kv_bytes_per_token(dims, server_dtype(spec.server_args))
    out.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        if spec.url:
            url, pid = spec.url, spec.server_pid
        else:
            cal = kvtc_calibration(model_path, spec.calibration, log) if "kvtc" in spec.method.names else None
            args = list(spec.server_args)
            if spec.budget_tokens and "--max-total-tokens" not in args:
                args += ["--max-total-tokens", str(spec.budget_tokens)]
            server = start_server(spec.method, model_path, cal, out / "logs", args, log)
            url, pid = server.url, server.proc.pid
        log(f"soak: {spec.method.label} at {rate:.3g} requests/s ({why}) for {spec.minutes:g} min, "
            f"{count} conversations of {spec.workload.spec}")
        plan = PointPlan(url=url, conversations=[c.to_dict() for c in convs], endpoint=spec.endpoint, load="poisson",
                         value=rate, offsets=schedule(LoadShape("poisson"), rate, count, spec.seed),
                         think_s=float(getattr(spec.workload, "think", 0.0) or 0.0),
                         replies=getattr(spec.workload, "replies", "server"), warmup_s=0.0,
                         max_time_s=duration + 300, tokenizer=str(model_path), seed=spec.seed, run=out.name,
                         method=spec.method.label, point=f"soak|{spec.method.label}|{rate:.3g}",
                         workload=spec.workload.spec)
        memory = MemorySampler(pid, spec.memory_every).start()
        t0 = time.time()
        alive = (lambda: server is None or (server.proc is not None and server.proc.poll() is None))
        rec = run_point(plan, out / "point", log, alive, 2.0, spec.slo, bytes_per_token)
        samples = memory.stop()
        idle = faults.idle_kv(faults.Target(url), wait=60)
        rows = read_rows(out / "point")
        series = json.loads((out / "point" / "series.json").read_text())
        result = analyse(rows, samples, series, duration, spec.windows, spec.slo, bytes_per_token, idle, t0)
    finally:
        if server is not None:
            server.stop()
    result.update({"method": spec.method.label, "workload": spec.workload.spec, "rate": rate, "rate_from": why,
                   "minutes": spec.minutes, "status": rec["status"], "reasons": rec["reasons"],
                   "slo": spec.slo.to_dict() if spec.slo else None, "memory_samples": samples,
                   "command": " ".join(sys.argv), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    write_report(out, result)
    return out


def _f(v, spec=".2f") -> str:
    return "-" if v is None or v != v else format(v, spec)


def write_report(out: Path, r: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flags = [k for k, v in (("latency drift (TTFT)", r["ttft_s_drift"]["flagged"]),
                            ("latency drift (TPOT)", r["tpot_s_drift"]["flagged"]),
                            ("memory growth", r["memory"]["flagged"]), ("KV held once idle", r["idle_kv_flagged"]))
             if v]
    o = r["overall"]
    lines = [f"# Soak: {r['method']} at {r['rate']:.3g} requests/s for {r['minutes']:g} min", "",
             f"Workload `{r['workload']}`; rate {r['rate_from']}; status {r['status']}"
             + (f" ({'; '.join(r['reasons'])})" if r["reasons"] else "") + ".",
             f"Command: `{r['command']}`", "",
             f"**Verdict: {'; '.join(flags) + ' flagged' if flags else 'no drift, no memory growth, no KV held once idle'}.**",
             "",
             f"- Requests: {o['requests']} sent, {o['failed']} failed, {_f(o['requests_per_s'])} completed/s; "
             f"TTFT p50/p99 {_f(o['ttft_s_p50'])} / {_f(o['ttft_s_p99'])} s, TPOT p50/p99 {_f(o['tpot_s_p50'], '.3f')} / "
             f"{_f(o['tpot_s_p99'], '.3f')} s" + (f", SLO attainment {_f(o['attainment'])}" if o.get("attainment") is not None else "")
             + f"; send lag p99 {_f((o['lag_p99_s'] or float('nan')) * 1000, '.1f')} ms.",
             ]
    for m, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT")):
        d = r[f"{m}_drift"]
        lines.append(f"- {name} median, last third of requests over the first third ({d['last_n']} and {d['first_n']}): "
                     f"{_f(d['ratio'], '.3f')} [95% {_f(d['lo'], '.3f')}, {_f(d['hi'], '.3f')}]"
                     + (" (drift)" if d["flagged"] else ""))
    mem = r["memory"]
    lines.append(f"- Server memory (RSS of its processes, {mem['samples']} samples): {_f(mem['first_mib'], '.0f')} -> "
                 f"{_f(mem['last_mib'], '.0f')} MiB; last third over first third (after the first window) "
                 f"{_f(mem['growth'] * 100 if mem['growth'] == mem['growth'] else float('nan'), '+.1f')}%; slope "
                 f"{_f(mem['slope_mib_per_hour'], '+.1f')} MiB/h" + (" (growth)" if mem["flagged"] else ""))
    lines.append(f"- KV held once idle (prefix cache flushed): {r['idle_kv_tokens']} tokens")
    lines += ["", "| window | from s | requests | failed | TTFT p50 / p99 s | TPOT p50 / p99 s | attainment | KV MiB | RSS MiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for w in r["windows"]:
        lines.append(f"| {w['window']} | {w['from_s']:.0f} | {w['requests']} | {w['failed']} | {_f(w['ttft_p50_s'])} / "
                     f"{_f(w['ttft_p99_s'])} | {_f(w['tpot_p50_s'], '.3f')} / {_f(w['tpot_p99_s'], '.3f')} | "
                     f"{_f(w['attainment'])} | {_f(w['kv_held_mean_mib'], '.1f')} | {_f(w['rss_mib'], '.0f')} |")
    lines += ["", "Plot: [plots/soak.png](plots/soak.png). Definitions: docs/campaigns.md (soak)."]
    (out / "plots").mkdir(exist_ok=True)
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
    mid = [(w["from_s"] + w["to_s"]) / 120 for w in r["windows"]]
    for key, style in (("ttft_p50_s", "o-"), ("ttft_p99_s", "s--")):
        ax[0].plot(mid, [w[key] for w in r["windows"]], style, label=key.replace("_s", ""))
    for key, style in (("tpot_p50_s", "o-"), ("tpot_p99_s", "s--")):
        ax[1].plot(mid, [w[key] for w in r["windows"]], style, label=key.replace("_s", ""))
    t0 = r["memory_samples"][0][0] if r["memory_samples"] else 0
    ax[2].plot([(t - t0) / 60 for t, _ in r["memory_samples"]], [v / 2**20 for _, v in r["memory_samples"]], "-",
               label="server RSS")
    for a, yl in zip(ax, ("TTFT (s)", "TPOT (s)", "MiB")):
        a.set_xlabel("minutes into the soak")
        a.set_ylabel(yl)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax[0].set_title(f"{r['method']}: TTFT per window", fontsize=9)
    ax[1].set_title("TPOT per window", fontsize=9)
    ax[2].set_title("server memory", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "plots" / "soak.png", dpi=110)
    plt.close(fig)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

