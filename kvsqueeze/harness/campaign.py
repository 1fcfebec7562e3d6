"""Load campaigns: workloads x loads x methods against one server per method, each point a Locust
run, written to one folder that resumes and rebuilds into a report.

A *point* is one workload at one load value (a rate of an open-loop shape, or a closed loop's
concurrency) against one method's server. Its conversations are the workload's for the point's seed
(the campaign's seed for the first point of each method, then one per point: points never replay
each other's prompts, so no point finds another's prefixes in a cache), sent as
:mod:`kvsqueeze.harness.arrivals` schedules them (:mod:`kvsqueeze.harness.driver`). Between points
the server's device prefix cache is flushed. Per point the folder keeps the plan, one row per request,
Locust's log and statistics, and the server's scrapes (``series.json``); ``points.json`` holds every
point's figures (:mod:`kvsqueeze.harness.measure`) and status.

Points run either as a sweep (``values``: every method at the same rates or concurrencies) or as a
capacity search per method and workload (:mod:`kvsqueeze.harness.capacity`) against an SLO
(:mod:`kvsqueeze.harness.slo`). A point is ``incomplete`` when its server died, Locust failed, or its
time ran out with requests unsent; its rows are kept and the campaign goes on (a capacity search
treats it as failing). ``resume`` keeps the complete points of a folder made with the same identity.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvsqueeze.backends.sglang.server import has_flag
from kvsqueeze.backends.sglang.serving import ServerSpec
from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.harness import capacity, measure
from kvsqueeze.harness.arrivals import LoadShape, schedule
from kvsqueeze.harness.client import ENDPOINTS
from kvsqueeze.harness.scrape import MetricsScraper, post, scrape
from kvsqueeze.harness.servers import (kv_bytes_per_token, kvtc_calibration, model_dims, server_dtype, slug,
                                       start_server)
from kvsqueeze.harness.slo import SLO
from kvsqueeze.harness.traffic import PointPlan, read_rows
from kvsqueeze.harness.workloads import Workload, WorkloadContext

DEFAULT_BUDGET = 8192
POINT_SEED_STRIDE = 1000  # point k of a method draws its conversations with seed + k * this
# a failed request whose error names one of these lost the server (it did not answer it with an error)
CONNECTION_LOST = ("ConnectionRefused", "ConnectionReset", "RemoteDisconnected", "BrokenPipe", "IncompleteRead")


@dataclass
class CampaignSpec:
    methods: list[ServerSpec]
    workloads: list[Workload]
    shape: LoadShape
    out_dir: Path
    values: list[float] = field(default_factory=list)  # a sweep; empty with search
    slo: SLO | None = None
    search: bool = False
    search_start: float = 1.0
    tolerance: float = 0.1
    max_points: int = 8
    duration_s: float | None = 60.0  # per point (open loop: the schedule's length)
    requests: int | None = None  # per point instead of a duration (conversations)
    warmup: str = "10%"  # seconds ("5" or "5s") or a share of the point's length ("10%")
    max_time_s: float | None = None  # per point; default twice the nominal length + 120 s
    url: str | None = None
    model: str | None = None
    endpoint: str = "generate"
    budget_tokens: int | None = DEFAULT_BUDGET
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = True
    calibration: str | None = None
    server_args: list[str] = field(default_factory=list)
    flush_between: bool = True
    resume: bool = False
    redo: list[str] = field(default_factory=list)  # with resume: methods whose points run again
    scrape_interval: float | None = 2.0

    def __post_init__(self):
        if not self.methods:
            raise bad_value("methods", "", "at least one method")
        if not self.workloads:
            raise bad_value("workload", "", "at least one workload")
        if self.url and len(self.methods) > 1:
            raise bad_value("methods", ",".join(m.label for m in self.methods),
                            "one method with --url (the server there runs one configuration)")
        if self.endpoint not in ENDPOINTS:
            raise bad_value("endpoint", self.endpoint, f"one of {', '.join(ENDPOINTS)}")
        if self.search:
            if self.slo is None:
                raise bad_value("search", "on", "an SLO to search against (--slo ttft=2s,tpot=150ms)")
            if self.values:
                raise bad_value("rates", self.values, "no rates or concurrencies with --search (it picks them)")
            self.search_start = self.shape.check_value(self.search_start, "search-start")
            if not 0 < self.tolerance < 1:
                raise bad_value("tolerance", self.tolerance, "a relative bracket width in (0, 1), e.g. 0.1")
            if self.max_points < 2:
                raise bad_value("max-points", self.max_points, "at least 2 points a search")
        else:
            if not self.values:
                raise bad_value("rates" if self.shape.open_loop else "concurrency", "",
                                "the points' values (--rates 1,2,4 or --concurrency 1,4), or --search with --slo")
            self.values = [self.shape.check_value(v, "rates" if self.shape.open_loop else "concurrency")
                           for v in self.values]
        if (self.duration_s is None) == (self.requests is None):
            raise bad_value("duration", self.duration_s, "either a duration or a request count per point")
        if self.duration_s is not None and not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise bad_value("duration", self.duration_s, "seconds > 0 per point")
        if self.requests is not None and self.requests < 1:
            raise bad_value("requests", self.requests, "a number of requests (conversations) per point >= 1")
        if self.max_time_s is not None and not self.max_time_s > 0:
            raise bad_value("max-time", self.max_time_s, "seconds > 0 per point")
        if self.budget_tokens is not None and self.budget_tokens < 1:
            raise bad_value("budget", self.budget_tokens, "KV tokens per server >= 1")
        if not 0 <= self.temperature <= 2:
            raise bad_value("temperature", self.temperature, "a sampling temperature in [0, 2]")
        parse_warmup(self.warmup, 1.0)
        if self.redo and not self.resume:
            raise bad_value("redo", ",".join(self.redo), "methods of a campaign continued with --resume")
        unknown = [m for m in self.redo if m not in [x.label for x in self.methods]]
        if unknown:
            raise bad_value("redo", ",".join(unknown), f"methods of the campaign ({', '.join(m.label for m in self.methods)})")

    def identity(self) -> dict:
        return {"methods": [m.label for m in self.methods], "workloads": [w.spec for w in self.workloads],
                "load": self.shape.label, "values": self.values, "search": self.search,
                "slo": self.slo.label if self.slo else None, "duration_s": self.duration_s,
                "requests": self.requests, "warmup": self.warmup, "endpoint": self.endpoint,
                "budget_tokens": self.budget_tokens, "seed": self.seed, "temperature": self.temperature,
                "url": self.url}

    def server_args_with_budget(self) -> list[str]:
        args = list(self.server_args)
        if self.budget_tokens and not has_flag(args, "--max-total-tokens"):
            args += ["--max-total-tokens", str(self.budget_tokens)]
        return args


def parse_warmup(text: str, length_s: float) -> float:
    """``10%`` of the point's nominal length, or ``5`` / ``5s`` seconds."""
    t = str(text).strip()
    try:
        if t.endswith("%"):
            share = float(t[:-1]) / 100
            if not 0 <= share < 1:
                raise ValueError
            return share * length_s
        v = float(t[:-1] if t.endswith("s") else t)
        if v < 0:
            raise ValueError
        return v
    except ValueError:
        raise bad_value("warmup", text, "seconds (5 or 5s) or a share of the point below 100% (10%)") from None


def point_label(method: str, workload: Workload, shape: LoadShape, value: float) -> str:
    return f"{method}|{workload.spec}|{shape.kind}={value:g}"


# ---------------------------------------------------------------------------------------------
# One point
# ---------------------------------------------------------------------------------------------
def run_point(plan: PointPlan, workdir: Path, log=print, server_alive=lambda: True,
              scrape_interval: float | None = 0.5, slo: SLO | None = None, bytes_per_token: float = 0.0,
              workers: int = 1) -> dict:
    """Run one point's Locust process (headless, one user; ``workers`` > 1: a master and that many
    workers on this machine) and return its record: status, reasons, client and server figures."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan.rows_csv = str(workdir / "requests.csv")
    plan.progress_file = str(workdir / "progress.txt")
    plan_path = workdir / "plan.json"
    plan.save(plan_path)
    locustfile = Path(__file__).with_name("campaign_locustfile.py")
    env = dict(os.environ, KVSQUEEZE_POINT_PLAN=str(plan_path), KVSQUEEZE_WORKERS=str(workers))
    limit = plan.max_time_s + 60
    base = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host", plan.url]
    record = {"point": plan.point, "method": plan.method, "workload": plan.workload, "load": plan.load,
              "value": plan.value, "status": "complete", "reasons": [], "started_unix": time.time(),
              "conversations": len(plan.conversations), "planned_requests": plan.requests()}
    scraper = MetricsScraper(plan.url, interval=scrape_interval).start()
    t0 = time.monotonic()
    procs = []
    with open(workdir / "locust.log", "wb") as logf:
        if workers > 1:
            cmd = base + ["--master", "--expect-workers", str(workers), "-u", str(workers), "-r", str(workers),
                          "--run-time", f"{int(limit)}s", "--stop-timeout", "10", "--only-summary",
                          "--exit-code-on-error", "0", "--csv", str(workdir / "locust"),
                          "--master-bind-port", str(_free_port())]
            master = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
            port = cmd[cmd.index("--master-bind-port") + 1]
            procs = [master] + [subprocess.Popen(base[:5] + ["--worker", "--master-port", port], env=env,
                                                 stdout=logf, stderr=subprocess.STDOUT) for _ in range(workers)]
        else:
            cmd = base + ["-u", "1", "-r", "1", "--run-time", f"{int(limit)}s", "--stop-timeout", "10",
                          "--only-summary", "--exit-code-on-error", "0", "--csv", str(workdir / "locust")]
            procs = [subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)]
        last = ""
        while procs[0].poll() is None:
            time.sleep(1.0)
            line = ", ".join(p.read_text() for p in sorted(workdir.glob("progress.txt*")) if p.exists())
            if line and line != last:
                log(f"  {plan.point}: {line}  {time.monotonic() - t0:4.0f}s")
                last = line
            if time.monotonic() - t0 > limit + 60:
                procs[0].kill()
                record["reasons"].append("Locust did not stop within the point's time limit; killed")
            if not server_alive():
                record["reasons"].append("the server died during the point")
                time.sleep(2)
                procs[0].terminate()
                break
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    record["locust_rc"] = procs[0].returncode
    if procs[0].returncode not in (0, None) and not record["reasons"]:
        record["reasons"].append(f"the load generator (Locust) exited with code {procs[0].returncode}; see "
                                 f"{workdir / 'locust.log'}")
    record["wall_s"] = round(time.monotonic() - t0, 1)
    server = scraper.stop()
    (workdir / "series.json").write_text(json.dumps(scraper.series))
    rows = read_rows(workdir)
    record["rows"] = len(rows)
    timed_out = sum("time limit" in (r.get("error") or "") for r in rows)
    missing = record["planned_requests"] - len(rows)
    if missing > 0 and plan.send_until_s is None:  # a closed loop with a duration sends what fits in it
        record["reasons"].append(f"{len(rows)}/{record['planned_requests']} planned requests ended (the rest were "
                                 "not sent: a failed turn ends its conversation, or the time ran out)")
    if timed_out:
        record["reasons"].append(f"{timed_out} requests were still running at the time limit")
    lost = sum(any(e in (r.get("error") or "") for e in CONNECTION_LOST) for r in rows)
    if lost:
        record["reasons"].append(f"{lost} requests lost their connection (the server stopped answering: "
                                 "refused, reset or closed)")
    figures = measure.point_figures(rows, slo)
    figures.update(measure.kv_figures(scraper.series, bytes_per_token, figures["requests"]))
    figures.update(measure.server_figures(server))
    record["figures"] = figures
    record["server"] = server
    if any("server died" in r or "Locust" in r for r in record["reasons"]) or timed_out or lost:
        record["status"] = "incomplete"
    return record


def _free_port() -> int:
    from kvsqueeze.backends.sglang.server import free_port

    return free_port()


# ---------------------------------------------------------------------------------------------
# The campaign
# ---------------------------------------------------------------------------------------------
class Campaign:
    """Runs a :class:`CampaignSpec`; ``run()`` returns the folder (report written)."""

    def __init__(self, spec: CampaignSpec, log=print):
        self.spec, self.log = spec, log
        self.out = Path(spec.out_dir)
        self.points: list[dict] = []
        self.meta: dict = {}
        self.kept: dict[str, dict] = {}

    # ---- set-up -------------------------------------------------------------------------------
    def prepare(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from kvsqueeze.model import resolve_model

        spec = self.spec
        if spec.url:
            budget = (scrape(spec.url) or {}).get("sglang:max_total_num_tokens")
            spec.budget_tokens = int(budget) if budget else None
        if spec.resume:
            self._check_resume()
        elif self.out.exists() and any(self.out.iterdir()):
            raise bad_value("out", str(self.out), "a new or empty directory for this campaign (or --resume it)")
        self.model_path = resolve_model(spec.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        cfg = AutoConfig.from_pretrained(self.model_path)
        limit = int(getattr(cfg, "max_position_embeddings", 0) or 0) or 2048
        self.context = min(limit, spec.budget_tokens or limit)
        self.dims = model_dims(self.model_path)
        dtype = server_dtype(spec.server_args)
        self.bytes_per_token = kv_bytes_per_token(self.dims, dtype)
        # every workload's first point is built now: a data set too short, a file with a bad line
        # or lengths past the context fail here, before any server starts
        for w in spec.workloads:
            self.conversations(w, 0, self._count(spec.search_start if spec.search else spec.values[0]))
        self.calibration = None
        if any("kvtc" in m.names for m in spec.methods) and not spec.url:
            self.calibration = kvtc_calibration(self.model_path, spec.calibration, self.log)
        if not spec.resume:
            self.meta = {"campaign": self.out.name, "model": str(self.model_path), "dims": self.dims,
                         "kv_bytes_per_token": self.bytes_per_token, "server_dtype": dtype,
                         "context_tokens": self.context, "identity": spec.identity(),
                         "slo": spec.slo.to_dict() if spec.slo else None, "load": asdict(spec.shape),
                         "calibration": self.calibration, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                         "status": "running", "command": " ".join(sys.argv)}

    def _check_resume(self) -> None:
        meta_path = self.out / "campaign.json"
        if not meta_path.is_file():
            raise bad_value("resume", str(self.out), "a campaign folder written by kvsqueeze campaign (with "
                            "campaign.json)")
        self.meta = json.loads(meta_path.read_text())
        theirs = self.meta.get("identity") or {}
        ours = json.loads(json.dumps(self.spec.identity()))
        diff = [k for k in ours if theirs.get(k) != ours[k]]
        if diff:
            raise bad_value("resume", str(self.out), "a campaign of the same methods, workloads, load, SLO, "
                            "points, seed and budget; it differs in " + ", ".join(
                                f"{k} ({theirs.get(k)!r} there, {ours[k]!r} here)" for k in diff))
        pts = self.out / "points.json"
        done = json.loads(pts.read_text()) if pts.is_file() else []
        self.kept = {p["point"]: p for p in done if p.get("status") == "complete" and p.get("method") not in self.spec.redo}
        self.meta["resumed"] = self.meta.get("resumed", []) + [time.strftime("%Y-%m-%d %H:%M:%S")
                                                               + (f" (redo {','.join(self.spec.redo)})" if self.spec.redo else "")]
        self.meta["status"] = "running"

    def _count(self, value: float) -> int:
        spec = self.spec
        if spec.requests:
            return spec.requests
        if spec.shape.open_loop:
            return max(2, math.ceil(value * spec.duration_s))
        return max(int(value), math.ceil(value * spec.duration_s / 2))  # enough for the duration at >= 2 s each

    def _length(self, value: float, count: int) -> float:
        """The point's nominal length in seconds (what the warm-up share and time limit scale with)."""
        if self.spec.duration_s:
            return self.spec.duration_s
        return count / value if self.spec.shape.open_loop else 60.0

    def conversations(self, w: Workload, k: int, count: int) -> list:
        ctx = WorkloadContext(self.tokenizer, self.context, self.spec.seed + k * POINT_SEED_STRIDE)
        return w.conversations(count, ctx)

    # ---- running -------------------------------------------------------------------------------
    def plan(self, m: ServerSpec, w: Workload, value: float, k: int, url: str) -> PointPlan:
        spec = self.spec
        count = self._count(value)
        convs = self.conversations(w, k, count)
        length = self._length(value, count)
        offsets = (schedule(spec.shape, value, count, seed=spec.seed + k * POINT_SEED_STRIDE)
                   if spec.shape.open_loop else [])
        return PointPlan(url=url, conversations=[c.to_dict() for c in convs], endpoint=spec.endpoint,
                         load=spec.shape.kind, value=value, offsets=offsets,
                         think_s=float(getattr(w, "think", 0.0) or 0.0),
                         replies=getattr(w, "replies", "server"),
                         warmup_s=parse_warmup(spec.warmup, length),
                         max_time_s=spec.max_time_s or 2 * length + 120,
                         send_until_s=None if spec.shape.open_loop or spec.requests else spec.duration_s,
                         temperature=spec.temperature,
                         ignore_eos=spec.ignore_eos, tokenizer=str(self.model_path),
                         seed=spec.seed + k * POINT_SEED_STRIDE, run=self.out.name, method=m.label,
                         point=point_label(m.label, w, spec.shape, value), workload=w.spec)

    def run(self) -> Path:
        from kvsqueeze.harness import campaign_report

        self.prepare()
        self.out.mkdir(parents=True, exist_ok=True)
        self._write()
        t_run = time.monotonic()
        try:
            for m in self.spec.methods:
                self._run_method(m)
            self.meta["status"] = ("complete" if all(p["status"] == "complete" for p in self.points)
                                   else "incomplete")
        except OSError as e:
            self.meta["status"] = "incomplete"
            self.meta["error"] = f"writing the results failed: {e}"
            raise KvsqueezeError(f"out={str(self.out)!r}: writing the results failed ({e.strerror or e}); "
                                 "the rows written so far are kept; expected a folder with free space") from e
        finally:
            self.meta["wall_s"] = round(self.meta.get("wall_s", 0) + time.monotonic() - t_run, 1)
            try:
                self._write()
            except OSError:
                pass
        campaign_report.build(self.out)
        return self.out

    def _write(self) -> None:
        tmp = self.out / "campaign.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=1))
        os.replace(tmp, self.out / "campaign.json")
        here = {p["point"] for p in self.points}  # kept points not reached yet stay on record
        (self.out / "points.json").write_text(json.dumps(self.points + [p for k, p in self.kept.items() if k not in here],
                                                         indent=1))

    def _run_method(self, m: ServerSpec) -> None:
        spec = self.spec
        state = {"server": None, "k": 0}

        def url() -> str:
            if spec.url:
                return spec.url
            if state["server"] is None or state["server"].proc is None:
                state["server"] = start_server(m, self.model_path, self.calibration, self.out / "logs",
                                               spec.server_args_with_budget(), self.log)
            return state["server"].url

        def alive() -> bool:
            s = state["server"]
            return s is None or (s.proc is not None and s.proc.poll() is None)

        try:
            for w in spec.workloads:
                def measure_value(value: float) -> bool:
                    rec = self._point(m, w, value, state, url, alive)
                    f = rec.get("figures") or {}
                    return rec["status"] == "complete" and bool(f.get("meets_target"))

                if spec.search:
                    res = capacity.search(measure_value, spec.search_start, spec.tolerance,
                                          integer=not spec.shape.open_loop, max_points=spec.max_points)
                    self.meta.setdefault("searches", {})[f"{m.label}|{w.spec}"] = res.as_dict()
                    self.log(f"  {m.label} {w.spec}: capacity {res.capacity} {spec.shape.unit} "
                             f"(lowest failing {res.lowest_failing}; {res.stopped})")
                else:
                    for value in spec.values:
                        measure_value(value)
                self._write()
        except KvsqueezeError as e:  # the server would not start: its points are recorded as not run
            self.log(f"  {m.label}: {e}")
            self.points.append({"point": f"{m.label}|*", "method": m.label, "status": "incomplete",
                                "reasons": [f"not run: {e}"], "figures": {}})
        finally:
            if state["server"] is not None:
                state["server"].stop()

    def _point(self, m: ServerSpec, w: Workload, value: float, state: dict, url, alive) -> dict:
        spec = self.spec
        label = point_label(m.label, w, spec.shape, value)
        k = state["k"]
        state["k"] += 1
        if label in self.kept:
            self.log(f"  {label}: kept from the earlier run")
            self.points.append(self.kept[label])
            return self.kept[label]
        try:
            target = url()
        except KvsqueezeError as e:
            rec = {"point": label, "method": m.label, "workload": w.spec, "load": spec.shape.kind,
                   "value": value, "status": "incomplete", "reasons": [f"not run: {e}"], "figures": {}}
            self.points.append(rec)
            return rec
        if spec.flush_between:
            post(target + "/flush_cache?timeout=300", timeout=400)
        plan = self.plan(m, w, value, k, target)
        self.log(f"[{m.label}] {w.spec} {spec.shape.kind} {value:g} {spec.shape.unit}: "
                 f"{len(plan.conversations)} conversations, {plan.requests()} requests")
        workdir = self.out / "points" / slug(label)
        shutil.rmtree(workdir, ignore_errors=True)  # a point not kept runs again from nothing
        rec = run_point(plan, workdir, self.log, alive, spec.scrape_interval, spec.slo, self.bytes_per_token)
        rec["seed"] = plan.seed
        f = rec["figures"]
        self.log(f"  -> {rec['status']}: {f.get('completed')}/{f.get('requests')} completed, "
                 f"TTFT p50 {f.get('ttft_s_p50', float('nan')):.2f} s, TPOT p50 {f.get('tpot_s_p50', float('nan')):.3f} s"
                 + (f", attainment {f['attainment']:.2f}" if "attainment" in f else "")
                 + (f" ({'; '.join(rec['reasons'])})" if rec["reasons"] else ""))
        s = state["server"]
        if s is not None and s.proc is not None and s.proc.poll() is not None:
            self.log(f"  the server exited (code {s.proc.returncode}); restarting it for the next point")
            s.stop()
        self.points.append(rec)
        self._write()
        return rec
