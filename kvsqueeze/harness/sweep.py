"""W-L sweeps: start each method's server (or target ``--url``), run Locust per configuration, scrape
the server's figures, and write ``results/<run>/`` (raw rows, configurations, report, plots).

Each configuration runs in two phases (``docs/metrics.md``): a *pilot* of a few questions at low
concurrency measures how much KV one question holds at its peak; the *batch* phase runs the remaining
questions at the largest concurrency the server's KV budget holds for that peak (capped by the
questions left), and checks that the server retracted nothing; after retractions, waves of fewer
questions at once verify the largest batch that runs without (``verify-N``, for throughput only).
Accuracy counts every question once; throughput at the maximum batch comes from the batch phase or
the verifying wave that passed. A run that stops part way resumes from
its finished configurations (``--resume RUN``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path

from kvsqueeze.backends.sglang.server import has_flag
from kvsqueeze.backends.sglang.serving import ServerSpec, parse_servers
from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.harness import axes
from kvsqueeze.harness.client import ENDPOINTS
from kvsqueeze.harness.plan import MODES, Plan, config_label
from kvsqueeze.harness.scrape import LAST_GAUGES, MetricsScraper, post
from kvsqueeze.harness.servers import (kv_bytes_per_token, kvtc_calibration, model_dims, server_dtype, slug,
                                       start_server)
from kvsqueeze.harness.tasks import DEFAULT_TASKS, make_questions, parse_tasks

GRID_KEYS = {"W": int, "L": int, "mode": str, "endpoint": str}
DEFAULT_GRID = {"W": [1, 4], "L": [8, 32], "mode": ["n"], "endpoint": ["generate"]}
DEFAULT_BUDGET = 8192  # KV tokens of every server the sweep starts (--max-total-tokens)
PILOT_QUESTIONS = 2
FILL_MAX = 64  # questions a filling wave sends at once at most (the default budget holds up to 55 DMS 8x questions)


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
    pilot_server: dict = field(default_factory=dict)  # the pilot phase's figures
    max_batch: dict = field(default_factory=dict)  # the prediction and its check (run_two_phase)


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
               server_alive=lambda: True, scrape_interval: float | None = 0.5) -> ConfigResult:
    """Run Locust headless on ``plan`` (a subprocess: gevent stays out of this process), polling the
    server's ``/metrics`` every ``scrape_interval`` seconds (None: only before and after)."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"-{plan.phase}" if plan.phase else ""
    plan.requests_csv = str(workdir / "requests.csv")  # both phases append to one file
    plan.progress_file = str(workdir / f"progress{tag}.txt")
    plan_path = workdir / f"plan{tag}.json"
    plan.save(plan_path)
    rows_before, bad_before = _count_rows(Path(plan.requests_csv))
    res = ConfigResult(plan.config, plan.method, plan.W, plan.L, plan.mode, plan.endpoint,
                       questions=len(plan.questions), started_unix=time.time())
    locustfile = Path(__file__).with_name("locustfile.py")
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless",
           "-u", str(plan.users), "-r", str(1000 * plan.users), "--host", plan.url,  # all users at once
           "--run-time", f"{int(max_time)}s", "--stop-timeout", "5", "--only-summary",
           "--exit-code-on-error", "0", "--csv", str(workdir / f"locust{tag}")]
    env = dict(os.environ, KVSQUEEZE_BENCH_PLAN=str(plan_path))
    scraper = MetricsScraper(plan.url, interval=scrape_interval).start()
    t0 = time.monotonic()
    with open(workdir / f"locust{tag}.log", "wb") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
        last = ""
        while proc.poll() is None:
            time.sleep(1.0)
            p = Path(plan.progress_file)
            line = p.read_text() if p.exists() else f"0/{len(plan.questions)} questions"
            if line != last:
                log(f"  {plan.config}{' ' + plan.phase if plan.phase else ''}: {line}  "
                    f"{time.monotonic() - t0:4.0f}s")
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
                           f"questions ran out; see {workdir / f'locust{tag}.log'}")
    res.wall_s = time.monotonic() - t0
    res.server = scraper.stop()
    rows_after, bad_after = _count_rows(Path(plan.requests_csv))
    res.rows, res.failed_rows = rows_after - rows_before, bad_after - bad_before
    done = res.rows // max(1, plan.W)
    if done < len(plan.questions):
        res.reasons.append(f"{done}/{len(plan.questions)} questions answered "
                           f"(time limit {max_time:.0f} s or server failure)")
    if res.failed_rows:
        res.reasons.append(f"{res.failed_rows} samples failed")
    if res.reasons:
        res.status = "incomplete"
    return res


def _rows_by_question(path: Path) -> dict[str, list[dict]]:
    import csv

    out: dict[str, list[dict]] = {}
    if path.exists():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                out.setdefault(row["qid"], []).append(row)
    return out


def run_two_phase(plan: Plan, workdir: Path, max_time: float, dims: dict, pilot: int = PILOT_QUESTIONS,
                  log=print, server_alive=lambda: True, prompt_tokens: dict | None = None,
                  fill_max: int = 0) -> ConfigResult:
    """The pilot on the first ``pilot`` questions at ``plan.users``, then the rest at the maximum batch
    (:mod:`kvsqueeze.harness.axes`); ``max_time`` applies to each phase.

    The batch is sized for the largest question of the set: each pilot question's measured peak is
    scaled by ``(longest prompt + L) / (its prompt + L)`` (``prompt_tokens``: qid -> tokens, counted
    with the model's tokenizer), and the largest of these is the peak per question."""
    questions = list(plan.questions)
    pilot = max(1, min(pilot, len(questions)))
    first = Plan(**{**asdict(plan), "questions": questions[:pilot], "users": min(plan.users, pilot),
                    "phase": "pilot"})
    res = run_config(first, workdir, max_time, log, server_alive)
    res.questions = len(questions)
    res.pilot_server = res.server
    rest = questions[pilot:]
    if not rest:
        return res
    if not server_alive():  # a server that died in the pilot gets no batch phase
        res.reasons = [r for r in res.reasons if "questions answered" not in r]
        res.reasons.append(f"{res.rows // max(1, plan.W)}/{len(questions)} questions answered (the server "
                           "died in the pilot phase)")
        res.status = "incomplete"
        return res
    by_q = _rows_by_question(workdir / "requests.csv")
    shares = plan.mode == "n"
    longest = max(prompt_tokens.values()) if prompt_tokens else None
    peaks, measured = [], []
    for q in questions[:pilot]:
        rows = by_q.get(q["qid"], [])
        peak = axes.question_peak_tokens(rows if rows and all(r.get("ok") == "1" for r in rows) else [],
                                         dims["layers"], dims["kv_heads"], shares)
        if not peak:
            continue
        measured.append(peak)
        mine = (prompt_tokens or {}).get(q["qid"])
        peaks.append(peak * (longest + plan.L) / (mine + plan.L) if longest and mine else peak)
    budget = res.server.get("last sglang:max_total_num_tokens")
    mb = {"budget_tokens": budget, "pilot_questions": pilot,
          "peak_per_question": max(peaks) if peaks else None, "pilot_peaks": measured,
          "peak_source": ("server" if peaks and any(r.get("kv_held_peak_server") for rows in by_q.values()
                                                    for r in rows) else "computed")}
    users = plan.users
    if not peaks or not budget:
        mb["why_not"] = ("the pilot gave no complete question" if not peaks else
                         "the server does not report its KV budget (sglang:max_total_num_tokens)")
    else:
        fit = axes.max_batch(budget, mb["peak_per_question"])
        users = max(1, min(fit, len(rest)))
        mb.update(predicted=fit, used=users, capped_by_questions=fit > len(rest))
        if fit < 1:
            res.reasons.append(f"one question holds {mb['peak_per_question']:.0f} KV tokens at its peak, more "
                               f"than the server's budget of {budget:.0f}; the rest ran one at a time")
    log(f"  {plan.config}: peak {mb.get('peak_per_question') or 0:.0f} KV tokens per question, budget "
        f"{budget or 0:.0f} -> {users} questions at once" + (" (all that are left)" if mb.get("capped_by_questions")
                                                             else ""))
    second = Plan(**{**asdict(plan), "questions": rest, "users": users, "phase": "batch"})
    res2 = run_config(second, workdir, max_time, log, server_alive)
    retracted = _retractions(res2.server)
    mb["retractions"] = retracted
    mb["verified"] = bool(retracted == 0) if retracted is not None else None
    mb["throughput_phase"] = "batch"
    mb["attempts"] = [{"users": users, "phase": "batch", "retractions": retracted}]
    if retracted and users > 1 and server_alive():
        _back_off(plan, rest, users, mb, workdir, max_time, log, server_alive)
    elif retracted == 0 and mb.get("capped_by_questions") and min(fit, fill_max) > users and server_alive():
        _fill(plan, rest, min(fit, fill_max), mb, workdir, max_time, log, server_alive)
    if retracted and not mb["verified"]:
        res2.reasons.append(f"the server retracted {retracted:.0f} requests at {users} questions at once: the "
                            "maximum batch is smaller than predicted" + (
                                f", and at {mb['attempts'][-1]['users']} as well" if len(mb["attempts"]) > 1 else ""))
    res.max_batch = mb
    res.server = res2.server
    res.rows += res2.rows
    res.failed_rows += res2.failed_rows
    res.wall_s += res2.wall_s
    res.locust_rc = res2.locust_rc if res2.locust_rc else res.locust_rc
    res.reasons = [r for r in res.reasons + res2.reasons if "questions answered" not in r]
    done = res.rows // max(1, plan.W)
    if done < len(questions):
        res.reasons.append(f"{done}/{len(questions)} questions answered (time limit {max_time:.0f} s per phase "
                           "or server failure)")
    res.status = "incomplete" if res.reasons else "complete"
    return res


def _retractions(server: dict) -> float | None:
    retracted = server.get("delta sglang:num_retracted_requests_total")
    if retracted is None and "peak sglang:num_running_reqs" in server:
        retracted = 0.0  # SGLang exports the counter from its first retraction on
    return retracted


def wave(questions: list, n: int) -> list:
    """``n`` questions for a throughput-only wave: the given ones in order, again as often as needed
    (repeats get their own qids, ``QID~k``, so their rows stay apart)."""
    out = []
    for k in range(n):
        q = questions[k % len(questions)]
        out.append(q if k < len(questions) else {**q, "qid": f"{q['qid']}~{k // len(questions)}"})
    return out


def _fill(plan: Plan, rest: list, fit: int, mb: dict, workdir: Path, max_time: float, log, server_alive) -> None:
    """The batch phase ran every question left, fewer than the budget holds: one wave of ``fit``
    questions at once (as many as the budget holds, up to ``--fill-max``; ``fill-N``: questions already
    answered, again, for throughput only, never counted for accuracy, reads or peaks) measures the
    throughput at the maximum batch. If it retracts, smaller waves verify the largest batch that runs
    without (as after a batch phase)."""
    probe = Plan(**{**asdict(plan), "questions": wave(rest, fit), "users": fit, "phase": f"fill-{fit}"})
    log(f"  {plan.config}: filling the batch: {fit} questions at once (answered ones again, for throughput)")
    got = run_config(probe, workdir, max_time, log, server_alive)
    retracted = _retractions(got.server)
    complete = got.rows == fit * plan.W and not got.failed_rows
    mb["attempts"].append({"users": fit, "phase": probe.phase, "retractions": retracted, "complete": complete})
    if retracted == 0 and complete:
        mb.update(used=fit, verified=True, throughput_phase=probe.phase, filled=True,
                  capped_by_questions=fit < int(mb["predicted"]))
    elif retracted and server_alive():
        _back_off(plan, rest, fit, mb, workdir, max_time, log, server_alive)


BACK_OFF = 0.75  # each verification after a retraction tries this share of the last concurrency
BACK_OFF_TRIES = 3


def _back_off(plan: Plan, rest: list, users: int, mb: dict, workdir: Path, max_time: float, log,
              server_alive) -> None:
    """The batch phase retracted at ``users`` questions at once: verify smaller batches, each one wave
    of that many of the batch's questions at once (``phase`` ``verify-N``; their answers are not
    counted again), until the server retracts none; the first that passes is the maximum batch and
    its wave gives the throughput."""
    for _ in range(BACK_OFF_TRIES):
        users = max(1, min(int(users * BACK_OFF), users - 1))
        probe = Plan(**{**asdict(plan), "questions": wave(rest, users), "users": users, "phase": f"verify-{users}"})
        log(f"  {plan.config}: retractions at {mb['attempts'][-1]['users']} questions at once; verifying {users}")
        got = run_config(probe, workdir, max_time, log, server_alive)
        retracted = _retractions(got.server)
        complete = got.rows == users * plan.W and not got.failed_rows
        mb["attempts"].append({"users": users, "phase": probe.phase, "retractions": retracted,
                               "complete": complete})
        if retracted == 0 and complete:
            mb.update(used=users, verified=True, retractions=0.0, throughput_phase=probe.phase,
                      capped_by_questions=False)
            return
        if users == 1 or not server_alive():
            return


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
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    questions_per_task: int = 6
    users: int = 2  # concurrency of the pilot phase
    temperature: float = 0.7
    max_time: float = 600.0
    seed: int = 0
    calibration: str | None = None
    flush_between: bool = True
    server_args: list[str] = field(default_factory=list)
    budget_tokens: int | None = DEFAULT_BUDGET  # None: the servers' own (SGLang's default)
    pilot: int = PILOT_QUESTIONS
    resume: bool = False
    redo: list[str] = field(default_factory=list)  # with resume: methods whose configurations run again
    fill_max: int = FILL_MAX  # a batch capped by the questions left is filled up to this many (0: not filled)

    def configs(self) -> list[tuple[int, int, str, str]]:
        g = self.grid
        return list(product(g["W"], g["L"], g["mode"], g["endpoint"]))

    def server_args_with_budget(self) -> list[str]:
        args = list(self.server_args)
        if self.budget_tokens and not has_flag(args, "--max-total-tokens"):
            args += ["--max-total-tokens", str(self.budget_tokens)]
        return args

    def identity(self) -> dict:
        """What a resumed run must share with the run it continues."""
        return {"methods": [m.label for m in self.methods], "grid": self.grid, "tasks": list(self.tasks),
                "questions_per_task": self.questions_per_task, "seed": self.seed,
                "temperature": self.temperature, "budget_tokens": self.budget_tokens, "url": self.url}


def check_fits(spec: BenchSpec, questions, model_path: Path) -> dict:
    """Refuse, before anything starts, a budget that cannot hold one question of a configuration: the
    longest prompt and the W samples' L tokens for a method whose samples share the prompt (a dense
    cache with its prefix cache), the longest prompt and L for DMS (whose samples share the prompt's
    slots through the radix cache when it holds them, and are admitted one at a time at worst).
    Returns prompt lengths."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    per_q = {q.qid: len(tok(q.prompt).input_ids) for q in questions}
    lengths = list(per_q.values())
    longest = max(lengths)
    if spec.budget_tokens:
        for m in spec.methods:
            for W, L, mode, _ in spec.configs():
                need = longest + L if ("dms" in m.names or mode != "n") else longest + W * L
                if need > spec.budget_tokens:
                    raise bad_value("budget", spec.budget_tokens,
                                    f"at least {need} KV tokens: one question of {m.label} W={W} L={L} "
                                    f"({mode}) holds up to {need} (longest prompt {longest} tokens)")
    return {"prompt_tokens_mean": sum(lengths) / len(lengths), "prompt_tokens_max": longest,
            "prompt_tokens": per_q}


def _check_resume(out: Path, spec: BenchSpec) -> tuple[dict, list[dict]]:
    if not (out / "run.json").is_file():
        raise bad_value("resume", str(out), "a run directory written by kvsqueeze bench (with run.json)")
    meta = json.loads((out / "run.json").read_text())
    theirs = meta.get("identity") or {}
    ours = json.loads(json.dumps(spec.identity()))
    diff = [k for k in ours if theirs.get(k) != ours[k]]
    if diff:
        raise bad_value("resume", str(out), "a run of the same grid, methods, tasks, questions, seed, "
                        "temperature, budget and target; it differs in " + ", ".join(
                            f"{k} ({theirs.get(k)!r} there, {ours[k]!r} here)" for k in diff))
    configs = json.loads((out / "configs.json").read_text()) if (out / "configs.json").is_file() else []
    return meta, [c for c in configs if c.get("status") == "complete" and c.get("method") not in spec.redo]


def run_bench(spec: BenchSpec, log=print) -> Path:
    """Run every (method, configuration); returns the run directory (report written)."""
    import shutil

    from kvsqueeze.harness import report
    from kvsqueeze.model import resolve_model

    out = spec.out_dir
    if spec.url:  # the budget is the server's own: its pool, from /metrics (none: not checked)
        budget = (MetricsScraper(spec.url).scrape() or {}).get("sglang:max_total_num_tokens")
        spec.budget_tokens = int(budget) if budget else None
    if spec.resume:
        meta, done = _check_resume(out, spec)
    elif out.exists() and any(out.iterdir()):
        raise bad_value("out", str(out), "a new or empty directory for this run (or --resume it)")
    if spec.url and len(spec.methods) > 1:
        raise bad_value("methods", ",".join(m.label for m in spec.methods),
                        "one method with --url (the server there runs one configuration)")
    if spec.users < 1:
        raise bad_value("users", spec.users, "a number of concurrent Locust users >= 1")
    if not spec.max_time > 0:
        raise bad_value("max-time", spec.max_time, "seconds > 0 per configuration")
    if spec.budget_tokens is not None and spec.budget_tokens < 1:
        raise bad_value("budget", spec.budget_tokens, "KV tokens per server >= 1")
    model_path = resolve_model(spec.model)
    dims = model_dims(model_path)
    questions = make_questions(parse_tasks(spec.tasks), spec.questions_per_task, spec.seed)
    if spec.resume:
        if Path(meta.get("model", "")) != Path(model_path):
            raise bad_value("resume", str(out), f"a run of model {model_path} (it ran {meta.get('model')})")
    prompts = check_fits(spec, questions, model_path)
    lengths = prompts.pop("prompt_tokens")
    calibration = None
    if any("kvtc" in m.names for m in spec.methods) and not spec.url:
        calibration = kvtc_calibration(model_path, spec.calibration, log)
    out.mkdir(parents=True, exist_ok=True)
    dtype = server_dtype(spec.server_args)
    if spec.resume:
        log(f"resuming {out}: {len(done)} configuration(s) finished, the others run again")
        kept = {c["config"] for c in done}
        for c in json.loads((out / "configs.json").read_text()) if (out / "configs.json").is_file() else []:
            if c["config"] not in kept:
                shutil.rmtree(out / "configs" / slug(c["config"]), ignore_errors=True)
        meta["resumed"] = meta.get("resumed", []) + [time.strftime("%Y-%m-%d %H:%M:%S")
                                                     + (f" (redo {','.join(spec.redo)})" if spec.redo else "")]
        meta["status"] = "running"
    else:
        done = []
        meta = {"run": out.name, "model": str(model_path), "dims": dims,
                "methods": [m.label for m in spec.methods], "grid": spec.grid,
                "tasks": spec.tasks, "questions_per_task": spec.questions_per_task, "split": "eval",
                "users": spec.users, "temperature": spec.temperature, "max_time_s": spec.max_time,
                "url": spec.url, "calibration": calibration, "flush_between": spec.flush_between,
                "budget_tokens": spec.budget_tokens, "pilot_questions": spec.pilot,
                "server_dtype": dtype, "kv_bytes_per_token": kv_bytes_per_token(dims, dtype),
                "weight_bytes": axes.weight_count(model_path) * axes.DTYPE_BYTES.get(dtype, 2),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "status": "running",
                "command": " ".join(sys.argv), "identity": spec.identity(), **prompts}
    log("measuring this machine's memory bandwidth (copy benchmark) ...")
    meta.setdefault("bandwidth", []).append(axes.copy_bandwidth())
    log(f"  {meta['bandwidth'][-1]['bytes_s'] / 1e9:.1f} GB/s")
    try:
        (out / "questions.json").write_text(json.dumps([q.to_dict() for q in questions], indent=1))
        _write_meta(out, meta)
        _run_all(spec, out, meta, questions, model_path, calibration, log, dims, done, lengths)
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


def _cost(W: int, L: int, n: int) -> float:
    """A configuration's rough cost, for the time-left estimate: its samples' tokens plus prompts."""
    return n * (W * L + 50)


def _run_all(spec: BenchSpec, out: Path, meta: dict, questions, model_path: Path, calibration, log,
             dims: dict, done: list[dict], lengths: dict | None = None) -> None:
    run_name = out.name
    configs = spec.configs()
    results: list[dict] = list(done)
    finished = {r["config"] for r in done}
    total = len(spec.methods) * len(configs)
    k = len(finished)
    t_run = time.monotonic()
    todo_cost = sum(_cost(W, L, len(questions)) for m in spec.methods for W, L, mode, ep in configs
                    if config_label(m.label, W, L, mode, ep) not in finished)
    spent_cost = 0.0
    server_args = spec.server_args_with_budget()
    for m in spec.methods:
        mine = [(W, L, mode, ep) for W, L, mode, ep in configs
                if config_label(m.label, W, L, mode, ep) not in finished]
        if not mine:
            continue
        server = None
        try:
            if not spec.url:
                server = start_server(m, model_path, calibration, out / "logs", server_args, log)
            url = spec.url or server.url
            for W, L, mode, endpoint in mine:
                k += 1
                label = config_label(m.label, W, L, mode, endpoint)
                elapsed = time.monotonic() - t_run
                eta = (f", about {elapsed / spent_cost * (todo_cost - spent_cost) / 60:.0f} min left"
                       if spent_cost else "")
                log(f"[{k}/{total}] {label}: {len(questions)} questions ({elapsed / 60:.1f} min into the "
                    f"run{eta})")
                if server is not None and server.proc is None:
                    try:
                        server = start_server(m, model_path, calibration, out / "logs", server_args, log)
                        url = server.url
                    except KvsqueezeError as e:
                        results.append(_skipped(label, m, W, L, mode, endpoint, str(e)))
                        continue
                if spec.flush_between:
                    post(url + "/flush_cache?timeout=300", timeout=400)
                plan = Plan(url=url, W=W, L=L, mode=mode, endpoint=endpoint,
                            temperature=spec.temperature, questions=[q.to_dict() for q in questions],
                            run=run_name, method=m.label, config=label, users=spec.users)
                alive = (lambda s=server: s is None or (s.proc is not None and s.proc.poll() is None))
                res = run_two_phase(plan, out / "configs" / slug(label), spec.max_time, dims, spec.pilot,
                                    log, alive, lengths, spec.fill_max)
                spent_cost += _cost(W, L, len(questions))
                if server is not None and server.proc is not None and server.proc.poll() is not None:
                    log(f"  the server exited (code {server.proc.returncode}); restarting it for "
                        "the next configuration")
                    server.stop()  # whatever is left of its process group; proc becomes None
                if spec.flush_between:  # pages go to the storage tier: its figures after the flush
                    post(url + "/flush_cache?timeout=300", timeout=400)
                    extra = MetricsScraper(url).scrape()
                    if extra:
                        for key in LAST_GAUGES:
                            if key in extra:
                                res.server[f"last {key}"] = extra[key]
                results.append(asdict(res))
                mb = res.max_batch
                log(f"  -> {res.status}: {res.rows} samples, {res.failed_rows} failed, {res.wall_s:.0f}s"
                    + (f", max batch {mb['used']} (retractions {mb.get('retractions')})" if mb.get("used") else "")
                    + (f" ({'; '.join(res.reasons)})" if res.reasons else ""))
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
    order = {config_label(m.label, *c): i for i, (m, c) in enumerate(product(spec.methods, configs))}
    results.sort(key=lambda r: order.get(r["config"], len(order)))
    (out / "configs.json").write_text(json.dumps(results, indent=1))
    meta["status"] = "complete" if all(r["status"] == "complete" for r in results) else "incomplete"
    meta["wall_s"] = round(meta.get("wall_s", 0) + time.monotonic() - t_run, 1)
    _write_meta(out, meta)


def _skipped(label, m, W, L, mode, endpoint, why) -> dict:
    return asdict(ConfigResult(label, m.label, W, L, mode, endpoint, status="incomplete",
                               reasons=[f"not run: {why}"]))


def _write_meta(out: Path, meta: dict) -> None:
    tmp = out / "run.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "run.json")
