"""W-L sweeps: start each method's server (or target ``--url``), run Locust per configuration, scrape
the server's figures, and write ``results/<run>/`` (raw rows, configurations, report, plots)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path

from kvsqueeze.backends.sglang.serving import ServeContext, ServerSpec, parse_servers, plan_server
from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.harness.client import ENDPOINTS
from kvsqueeze.harness.plan import MODES, Plan, config_label
from kvsqueeze.harness.tasks import make_questions, parse_tasks

GRID_KEYS = {"W": int, "L": int, "mode": str, "endpoint": str}
DEFAULT_GRID = {"W": [1, 4], "L": [32, 64], "mode": ["n"], "endpoint": ["generate"]}


def parse_grid(items: list[str] | None) -> dict[str, list]:
    """``["W=1,2,4", "L=128,256", "mode=n,concurrent"]`` -> lists per key (defaults for the rest)."""
    grid = {k: list(v) for k, v in DEFAULT_GRID.items()}
    for item in items or []:
        for part in item.split():
            key, eq, values = part.partition("=")
            if not eq or key not in GRID_KEYS:
                raise bad_value("grid", part, f"KEY=V1,V2,... with KEY one of {', '.join(GRID_KEYS)}")
            out = []
            for v in values.split(","):
                v = v.strip()
                if GRID_KEYS[key] is int:
                    if not re.fullmatch(r"\d+", v) or int(v) < 1:
                        raise bad_value(f"grid {key}", v, "a whole number >= 1")
                    out.append(int(v))
                else:
                    allowed = MODES if key == "mode" else tuple(ENDPOINTS)
                    if v not in allowed:
                        raise bad_value(f"grid {key}", v, f"one of {', '.join(allowed)}")
                    out.append(v)
            if not out:
                raise bad_value(f"grid {key}", values, "at least one value")
            grid[key] = list(dict.fromkeys(out))
    return grid


def parse_methods(text: str | None) -> list[ServerSpec]:
    """``--methods``: servers separated by commas, each one method or several joined by ``+``
    (:func:`kvsqueeze.backends.sglang.serving.parse_servers`)."""
    return parse_servers(text)


# ---------------------------------------------------------------------------------------------
# Server-side figures
# ---------------------------------------------------------------------------------------------
PEAK_GAUGES = ("sglang:num_used_tokens", "sglang:num_running_reqs", "sglang:token_usage",
               "sglang:num_queue_reqs", "kvsqueeze_kv_tokens_held", "kvsqueeze_dms_held_tokens",
               "kvsqueeze_dms_dense_tokens")
COUNTERS = ("sglang:prompt_tokens_total", "sglang:generation_tokens_total",
            "sglang:num_requests_total", "kvsqueeze_kvtc_pages_stored", "kvsqueeze_kvtc_hits",
            "kvsqueeze_kvtc_misses", "kvsqueeze_kvtc_restore_seconds",
            "kvsqueeze_kvtc_encode_seconds", "kvsqueeze_kv_token_reads_total",
            "kvsqueeze_fusion_pages_checked", "kvsqueeze_fusion_pages_fused")
LAST_GAUGES = ("sglang:max_total_num_tokens", "kvsqueeze_dms_kept_fraction", "kvsqueeze_dms_peak_sequences",
               "kvsqueeze_kvtc_pages_held",
               "kvsqueeze_kvtc_bytes_before", "kvsqueeze_kvtc_bytes_after",
               "kvsqueeze_fusion_pages_saved", "kvsqueeze_fusion_groups")


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of every sample of each metric name (labels dropped), histograms' raw series included."""
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
        out[m.group(1)] = out.get(m.group(1), 0.0) + v
    return out


class MetricsScraper:
    """Polls ``/metrics`` in a thread: peaks of gauges, deltas of counters, last values."""

    def __init__(self, url: str, interval: float = 0.5):
        self.url, self.interval = url.rstrip("/") + "/metrics", interval
        self.first: dict[str, float] | None = None
        self.last: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.polls = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def scrape(self) -> dict[str, float] | None:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as r:
                return parse_prometheus(r.read().decode("utf-8", "replace"))
        except (urllib.error.URLError, OSError, ValueError):
            self.errors += 1
            return None

    def _take(self, values: dict[str, float] | None) -> None:
        if values is None:
            return
        self.polls += 1
        if self.first is None:
            self.first = values
        self.last = values
        for k in PEAK_GAUGES:
            if k in values:
                self.peak[k] = max(self.peak.get(k, float("-inf")), values[k])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._take(self.scrape())
            self._stop.wait(self.interval)

    def start(self) -> "MetricsScraper":
        self._take(self.scrape())
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
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


def _post(url: str, timeout: float = 300.0) -> int | None:
    try:
        req = urllib.request.Request(url, data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except (urllib.error.URLError, OSError):
        return None


# ---------------------------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class ConfigResult:
    config: str
    method: str
    W: int
    L: int
    mode: str
    endpoint: str
    status: str = "complete"  # complete | incomplete
    reasons: list[str] = field(default_factory=list)
    started_unix: float = 0.0
    wall_s: float = 0.0
    questions: int = 0
    rows: int = 0
    failed_rows: int = 0
    server: dict = field(default_factory=dict)
    locust_rc: int | None = None


def _count_rows(path: Path) -> tuple[int, int]:
    import csv

    if not path.exists():
        return 0, 0
    n = bad = 0
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            n += 1
            bad += row.get("ok") != "1"
    return n, bad


def run_config(plan: Plan, workdir: Path, max_time: float, log=print,
               server_alive=lambda: True) -> ConfigResult:
    """Run Locust headless on ``plan`` (a subprocess: gevent stays out of this process)."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan.requests_csv = str(workdir / "requests.csv")
    plan.progress_file = str(workdir / "progress.txt")
    plan_path = workdir / "plan.json"
    plan.save(plan_path)
    res = ConfigResult(plan.config, plan.method, plan.W, plan.L, plan.mode, plan.endpoint,
                       questions=len(plan.questions), started_unix=time.time())
    locustfile = Path(__file__).with_name("locustfile.py")
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless",
           "-u", str(plan.users), "-r", str(plan.users), "--host", plan.url,
           "--run-time", f"{int(max_time)}s", "--stop-timeout", "5", "--only-summary",
           "--exit-code-on-error", "0", "--csv", str(workdir / "locust")]
    env = dict(os.environ, KVSQUEEZE_BENCH_PLAN=str(plan_path))
    scraper = MetricsScraper(plan.url).start()
    t0 = time.monotonic()
    with open(workdir / "locust.log", "wb") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
        last = ""
        while proc.poll() is None:
            time.sleep(1.0)
            p = Path(plan.progress_file)
            line = p.read_text() if p.exists() else f"0/{len(plan.questions)} questions"
            if line != last:
                log(f"  {plan.config}: {line}  {time.monotonic() - t0:4.0f}s")
                last = line
            if time.monotonic() - t0 > max_time + 60:
                proc.kill()
                res.reasons.append("locust did not stop within its time limit; killed")
            if not server_alive():
                res.reasons.append("the server died during the run")
                time.sleep(2)  # let the in-flight requests fail and be written
                proc.terminate()
                break
        proc.wait(30)
    res.locust_rc = proc.returncode
    if proc.returncode not in (0, None) and not res.reasons:
        res.reasons.append(f"the load generator (Locust) exited with code {proc.returncode} before the "
                           f"questions ran out; see {workdir / 'locust.log'}")
    res.wall_s = time.monotonic() - t0
    res.server = scraper.stop()
    res.rows, res.failed_rows = _count_rows(Path(plan.requests_csv))
    done = res.rows // max(1, plan.W)
    if done < len(plan.questions):
        res.reasons.append(f"{done}/{len(plan.questions)} questions answered "
                           f"(time limit {max_time:.0f} s or server failure)")
    if res.failed_rows:
        res.reasons.append(f"{res.failed_rows} samples failed")
    if res.reasons:
        res.status = "incomplete"
    return res


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------
@dataclass
class BenchSpec:
    methods: list[ServerSpec]
    grid: dict[str, list]
    out_dir: Path
    url: str | None = None
    model: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["passkey", "lookup", "arithmetic"])
    questions_per_task: int = 3
    users: int = 2
    temperature: float = 0.7
    max_time: float = 150.0
    seed: int = 0
    calibration: str | None = None
    flush_between: bool = True
    server_args: list[str] = field(default_factory=list)

    def configs(self) -> list[tuple[int, int, str, str]]:
        g = self.grid
        return list(product(g["W"], g["L"], g["mode"], g["endpoint"]))


def model_dims(model_path: Path) -> dict:
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    return {"layers": int(cfg["num_hidden_layers"]),
            "kv_heads": int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])),
            "head_dim": int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]),
            "bytes_per_value": 2}


def kvtc_calibration(model_path: Path, given: str | None, log=print) -> str:
    """The calibration the ``kvtc`` servers run with: the one given, the model's full one, or its
    quick one, made once and cached (so that ``kvsqueeze bench`` on a fresh install stays within its
    time budget); the report names which one served."""
    from kvsqueeze.methods.kvtc.calibrate import calibration_for
    from kvsqueeze.model import load_hf

    if given:
        return str(calibration_for(None, given=given))
    tok, model = load_hf(model_path)
    return str(calibration_for(model, tok, quick=True, log=log))


def run_bench(spec: BenchSpec, log=print) -> Path:
    """Run every (method, configuration); returns the run directory (report written)."""
    from kvsqueeze.harness import report
    from kvsqueeze.model import resolve_model

    out = spec.out_dir
    if out.exists() and any(out.iterdir()):
        raise bad_value("out", str(out), "a new or empty directory for this run")
    if spec.url and len(spec.methods) > 1:
        raise bad_value("methods", ",".join(m.label for m in spec.methods),
                        "one method with --url (the server there runs one configuration)")
    if spec.users < 1:
        raise bad_value("users", spec.users, "a number of concurrent Locust users >= 1")
    if not spec.max_time > 0:
        raise bad_value("max-time", spec.max_time, "seconds > 0 per configuration")
    model_path = resolve_model(spec.model)
    dims = model_dims(model_path)
    questions = make_questions(parse_tasks(spec.tasks), spec.questions_per_task, spec.seed)
    calibration = None
    if any("kvtc" in m.names for m in spec.methods) and not spec.url:
        calibration = kvtc_calibration(model_path, spec.calibration, log)
    out.mkdir(parents=True, exist_ok=True)
    run_name = out.name
    meta = {"run": run_name, "model": str(model_path), "dims": dims,
            "methods": [m.label for m in spec.methods], "grid": spec.grid,
            "tasks": spec.tasks, "questions_per_task": spec.questions_per_task,
            "users": spec.users, "temperature": spec.temperature, "max_time_s": spec.max_time,
            "url": spec.url, "calibration": calibration, "flush_between": spec.flush_between,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "status": "running",
            "command": " ".join(sys.argv)}
    try:
        (out / "questions.json").write_text(json.dumps([q.to_dict() for q in questions], indent=1))
        _write_meta(out, meta)
        _run_all(spec, out, meta, questions, model_path, calibration, log)
        report.build(out)
    except OSError as e:  # the results directory is full or unwritable: keep what is there
        meta["status"] = "incomplete"
        meta["error"] = f"writing the results failed: {e}"
        try:
            _write_meta(out, meta)
        except OSError:
            pass
        raise KvsqueezeError(
            f"out={str(out)!r}: writing the results failed ({e.strerror or e}"
            + (f": {e.filename}" if e.filename else "") + "); the rows written so far are kept and "
            "the run is marked incomplete where run.json could be written; expected a results "
            "directory with free space") from e
    return out


def _run_all(spec: BenchSpec, out: Path, meta: dict, questions, model_path: Path, calibration, log) -> None:
    run_name = out.name
    configs = spec.configs()
    results: list[dict] = []
    total = len(spec.methods) * len(configs)
    k = 0
    t_run = time.monotonic()
    for m in spec.methods:
        server = None
        try:
            if not spec.url:
                server = _start_server(m, model_path, calibration, out, spec.server_args, log)
            url = spec.url or server.url
            for W, L, mode, endpoint in configs:
                k += 1
                label = config_label(m.label, W, L, mode, endpoint)
                log(f"[{k}/{total}] {label}  ({time.monotonic() - t_run:.0f}s into the run)")
                if server is not None and server.proc is None:
                    try:
                        server = _start_server(m, model_path, calibration, out,
                                               spec.server_args, log)
                        url = server.url
                    except KvsqueezeError as e:
                        results.append(_skipped(label, m, W, L, mode, endpoint, str(e)))
                        continue
                if spec.flush_between:
                    _post(url + "/flush_cache?timeout=300", timeout=400)
                plan = Plan(url=url, W=W, L=L, mode=mode, endpoint=endpoint,
                            temperature=spec.temperature, questions=[q.to_dict() for q in questions],
                            run=run_name, method=m.label, config=label, users=spec.users)
                alive = (lambda s=server: s is None or (s.proc is not None and s.proc.poll() is None))
                res = run_config(plan, out / "configs" / _slug(label), spec.max_time, log, alive)
                if server is not None and server.proc is not None and server.proc.poll() is not None:
                    log(f"  the server exited (code {server.proc.returncode}); restarting it for "
                        "the next configuration")
                    server.stop()  # whatever is left of its process group; proc becomes None
                if spec.flush_between:  # pages go to the storage tier: its figures after the flush
                    _post(url + "/flush_cache?timeout=300", timeout=400)
                    extra = MetricsScraper(url).scrape()
                    if extra:
                        for key in LAST_GAUGES:
                            if key in extra:
                                res.server[f"last {key}"] = extra[key]
                results.append(asdict(res))
                log(f"  -> {res.status}: {res.rows} samples, {res.failed_rows} failed, "
                    f"{res.wall_s:.0f}s" + (f" ({'; '.join(res.reasons)})" if res.reasons else ""))
                (out / "configs.json").write_text(json.dumps(results, indent=1))
        except KvsqueezeError as e:
            log(f"  {m.label}: {e}")
            for W, L, mode, endpoint in configs:
                label = config_label(m.label, W, L, mode, endpoint)
                if not any(r["config"] == label for r in results):
                    results.append(_skipped(label, m, W, L, mode, endpoint, str(e)))
        finally:
            if server is not None:
                server.stop()
        (out / "configs.json").write_text(json.dumps(results, indent=1))
    meta["status"] = "complete" if all(r["status"] == "complete" for r in results) else "incomplete"
    meta["wall_s"] = round(time.monotonic() - t_run, 1)
    _write_meta(out, meta)


def _skipped(label, m, W, L, mode, endpoint, why) -> dict:
    return asdict(ConfigResult(label, m.label, W, L, mode, endpoint, status="incomplete",
                               reasons=[f"not run: {why}"]))


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", label).strip("_")


def _write_meta(out: Path, meta: dict) -> None:
    tmp = out / "run.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "run.json")


def _start_server(m: ServerSpec, model_path: Path, calibration, out: Path, extra: list[str], log):
    from kvsqueeze.backends.sglang.server import SGLangServer, free_port

    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ctx = ServeContext(model=model_path, log=log, calibration=calibration, quick_calibration=True,
                       stats_file=str(logs / f"{_slug(m.label)}-kvtc-stats.json"))
    plan = plan_server(m, ctx, extra)
    server = SGLangServer(model=model_path, port=free_port(), extra_args=plan.args + list(extra), env=plan.env,
                          log_path=logs / f"server-{_slug(m.label)}.log")
    log(f"starting SGLang for {m.label} ({m.summary}) ...")
    t0 = time.monotonic()
    server.start()
    try:
        server.wait_ready(timeout=400)
    except BaseException:
        server.stop()
        raise
    log(f"  ready at {server.url} after {time.monotonic() - t0:.0f}s")
    return server
