"""Locust user for one campaign point (``KVSQUEEZE_POINT_PLAN``: the point's plan file).

``kvsqueeze campaign`` runs it headless with one user (``-u 1``). In Locust's distributed mode run
it with ``--master --expect-workers N -u N`` and N ``--worker`` processes started with
``KVSQUEEZE_WORKERS=N``: each worker's user sends the conversations whose index it owns (round robin,
so each request of the schedule is sent once) and writes ``requests-w<index>.csv``. The master tells
the workers one wall-clock start time once every user is spawned, so their schedules line up; each
worker reports when its share is done and the master ends the run when all have.

Locust's own statistics get two entries per request: ``<endpoint>`` (end-to-end, failures marked) and
``<endpoint> TTFT``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import gevent
import gevent.event
from locust import User, constant, events, task
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

from kvsqueeze.harness.driver import PointDriver
from kvsqueeze.harness.plan import RowWriter
from kvsqueeze.harness.traffic import ROW_FIELDS, PointPlan

PLAN = PointPlan.load_file(os.environ["KVSQUEEZE_POINT_PLAN"])
WORKERS = int(os.environ.get("KVSQUEEZE_WORKERS", "1"))
_sync = {"start": gevent.event.Event(), "at": None, "done": set(), "writer": None, "env": None}


def _on_start_message(environment, msg, **_kw):
    _sync["at"] = float(msg.data["at"])
    _sync["start"].set()


def _on_done_message(environment, msg, **_kw):
    _sync["done"].add(msg.data["worker"])
    if len(_sync["done"]) >= WORKERS:
        gevent.spawn_later(0.1, environment.runner.quit)


@events.init.add_listener
def _init(environment, **_kw):
    _sync["env"] = environment
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        runner.register_message("kvsqueeze_done", _on_done_message)
    elif isinstance(runner, WorkerRunner):
        runner.register_message("kvsqueeze_start", _on_start_message)


@events.spawning_complete.add_listener
def _spawned(user_count, **_kw):
    runner = _sync["env"].runner
    if isinstance(runner, MasterRunner):  # every worker starts its schedule at the same wall-clock time
        runner.send_message("kvsqueeze_start", {"at": time.time() + 1.0})


@events.test_stop.add_listener
def _close(environment, **_kw):
    if _sync["writer"] is not None:
        _sync["writer"].close()
        _sync["writer"] = None


class CampaignUser(User):
    """Sends the point's traffic (its share, on a worker), then stops."""

    wait_time = constant(0)
    host = PLAN.url

    @task
    def point(self):
        runner = self.environment.runner
        worker = runner.worker_index if isinstance(runner, WorkerRunner) else 0
        path = Path(PLAN.rows_csv)
        if isinstance(runner, WorkerRunner):
            path = path.with_name(f"{path.stem}-w{worker}{path.suffix}")
        _sync["writer"] = RowWriter(path, ROW_FIELDS)
        if isinstance(runner, WorkerRunner):
            _sync["start"].wait()
            start = time.perf_counter() + (_sync["at"] - time.time())
        else:
            start = time.perf_counter()
        driver = PointDriver(PLAN, worker, WORKERS if isinstance(runner, WorkerRunner) else 1,
                             write=_sync["writer"].write, on_result=self._fire)
        driver.run(start)
        _sync["writer"].close()
        _sync["writer"] = None
        if isinstance(runner, WorkerRunner):
            runner.send_message("kvsqueeze_done", {"worker": worker})
        else:
            gevent.spawn_later(0.1, runner.quit)
        raise StopUser()

    def _fire(self, res) -> None:
        name = PLAN.endpoint
        self.environment.events.request.fire(
            request_type="POST", name=name, response_time=(res.total_s or 0) * 1000, response_length=0,
            exception=None if res.ok else RuntimeError(res.error), context={})
        s = res.samples[0] if res.samples else None
        if s is not None and s.ttft_s is not None:
            self.environment.events.request.fire(request_type="POST", name=f"{name} TTFT",
                                                 response_time=s.ttft_s * 1000, response_length=0,
                                                 exception=None, context={})
