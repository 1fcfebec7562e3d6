"""Locust users for kvsqueeze's W-L load runs.

Works three ways with the same file:

- ``kvsqueeze bench`` runs it headless, one plan per configuration (``KVSQUEEZE_BENCH_PLAN``);
- plain ``locust -f kvsqueeze/harness/locustfile.py --host http://127.0.0.1:30000`` (web UI or
  ``--headless``) runs the default plan: the embedded tasks, W=1, L=64, ``/generate``;
- Locust's distributed mode (``--master`` / ``--worker``) for large campaigns: every worker asks the
  whole question list and writes its own ``requests-w<index>.csv`` beside the plan's CSV.

Each user takes the next question, asks it as one request with ``n=W`` (mode ``n``) or as W concurrent
requests with the same prompt (mode ``concurrent``), and writes one row per sample. Locust's own
statistics get two entries per request: ``<endpoint>`` (end-to-end, failed requests marked) and
``<endpoint> TTFT``. When the questions run out the users stop and the run ends.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import gevent
from locust import User, constant, events, task
from locust.exception import StopUser
from locust.runners import WorkerRunner

from kvsqueeze.harness.client import Client, build_body
from kvsqueeze.harness.plan import RowWriter, plan_from_env, rows_for

PLAN = plan_from_env()
_state = {"next": 0, "done": 0, "writer": None, "active": 0}


def _writer(environment) -> RowWriter:
    if _state["writer"] is None:
        path = Path(PLAN.requests_csv)
        runner = environment.runner
        if isinstance(runner, WorkerRunner):
            path = path.with_name(f"{path.stem}-w{runner.worker_index}{path.suffix}")
        _state["writer"] = RowWriter(path)
    return _state["writer"]


def _progress() -> None:
    line = f"{_state['done']}/{len(PLAN.questions)} questions"
    if PLAN.progress_file:
        Path(PLAN.progress_file).write_text(line)


@events.test_stop.add_listener
def _close(environment, **_kw):
    if _state["writer"] is not None:
        _state["writer"].close()
        _state["writer"] = None


class KVSqueezeUser(User):
    """A client that asks the plan's questions, one at a time, W samples each."""

    wait_time = constant(0)
    host = PLAN.url

    def on_start(self):
        self.clients = [Client(self.host or PLAN.url) for _ in range(PLAN.W if PLAN.mode ==
                                                                     "concurrent" else 1)]
        _state["active"] += 1

    def on_stop(self):
        for c in self.clients:
            c.close()

    def _fire(self, name: str, ms: float | None, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="POST", name=name, response_time=ms or 0.0, response_length=0,
            exception=exc, context={})

    @task
    def ask(self):
        i = _state["next"]
        if i >= len(PLAN.questions):
            _state["active"] -= 1
            if _state["active"] <= 0 and not isinstance(self.environment.runner, WorkerRunner):
                gevent.spawn_later(0.1, self.environment.runner.quit)
            raise StopUser()
        _state["next"] += 1
        q = PLAN.questions[i]
        if PLAN.mode == "n":
            body = build_body(PLAN.endpoint, q["prompt"], PLAN.W, PLAN.L, PLAN.temperature,
                              ignore_eos=PLAN.ignore_eos)
            results = [self.clients[0].stream(PLAN.endpoint, body)]
        else:
            body = build_body(PLAN.endpoint, q["prompt"], 1, PLAN.L, PLAN.temperature,
                              ignore_eos=PLAN.ignore_eos)
            jobs = [gevent.spawn(c.stream, PLAN.endpoint, body) for c in self.clients]
            gevent.joinall(jobs)
            results = [j.value for j in jobs]
        rows = rows_for(PLAN, q, f"{PLAN.config}#{q['qid']}", results)
        _writer(self.environment).write(rows)
        for res in results:
            exc = None if res.ok else RuntimeError(res.error)
            self._fire(PLAN.endpoint, (res.total_s or 0) * 1000, exc)
            for s in res.samples:
                if s.ttft_s is not None:
                    self._fire(f"{PLAN.endpoint} TTFT", s.ttft_s * 1000, None)
        _state["done"] += 1
        _progress()


if __name__ == "__main__":  # pragma: no cover - a hint, not an entry point
    print("run me with: locust -f " + os.path.abspath(__file__), file=sys.stderr)
