"""Sends one campaign point's traffic from a gevent process (a Locust user runs it).

Open loop: conversation ``i`` starts at ``start + offsets[i]`` whether or not earlier ones were
answered (a scheduler greenlet sleeps until each one is due and hands it to a greenlet of its own);
closed loop: ``value`` client greenlets, each starting its next conversation when its last one ended.
A conversation's turns run in order, each after the reply to the last and a think time (exponential,
seeded per conversation and turn); each request takes an idle keep-alive connection or opens one.

Split between ``workers`` load generators, each sends the conversations whose index it owns
(:func:`kvsqueeze.harness.arrivals.owned`) and, in a closed loop, its share of the clients: no
request is sent twice. Every request ends as a row: answered, failed with the client's reason, or
still running when the point's time ran out (recorded as failed, with that reason).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import gevent
from gevent import GreenletExit

from kvsqueeze.harness.arrivals import owned
from kvsqueeze.harness.client import Client
from kvsqueeze.harness.traffic import Formatter, PointPlan, row_for
from kvsqueeze.harness.workloads import Conversation


class PointDriver:
    def __init__(self, plan: PointPlan, worker: int = 0, workers: int = 1, write=lambda rows: None,
                 on_result=lambda res: None):
        self.plan, self.worker, self.workers = plan, worker, workers
        self.convs = [Conversation.from_dict(c) for c in plan.conversations]
        self.mine = [i for i in range(len(self.convs)) if owned(i, worker, workers)]
        self.total = sum(len(self.convs[i].turns) for i in self.mine)
        self.fmt = Formatter(plan)
        self.write, self.on_result = write, on_result
        self.idle: list[Client] = []
        self.finished = 0
        self.start = 0.0

    # ---- one conversation ---------------------------------------------------------------------
    def _client(self) -> Client:
        return self.idle.pop() if self.idle else Client(self.plan.url, timeout=max(60.0, self.plan.max_time_s))

    def conversation(self, i: int, due: float) -> None:
        conv = self.convs[i]
        replies: list[str] = []
        k, client = 0, None
        try:
            for k, turn in enumerate(conv.turns):
                if k and self.plan.think_s > 0:
                    rng = random.Random(f"{self.plan.seed}:{conv.cid}:{k}")
                    gevent.sleep(rng.expovariate(1.0 / self.plan.think_s))
                if k:
                    due = time.perf_counter()
                body, _ = self.fmt.body(conv, k, replies)
                client = self._client()
                res = client.stream(self.plan.endpoint, body)
                self.idle.append(client)
                client = None
                self._record(row_for(self.plan, conv, k, self.worker, due, self.start, res))
                self.on_result(res)
                if not res.ok:
                    return  # the user would not go on; later turns are not sent
                replies.append((turn.reply or "") if self.plan.replies == "recorded" else res.samples[0].text)
        except GreenletExit:
            if client is not None:
                client.close()
                self._record(row_for(self.plan, conv, k, self.worker, due, self.start, None,
                                     error=f"still running when the point's time limit ({self.plan.max_time_s:.0f} s) "
                                           "ended"))
            raise

    def _record(self, row: dict) -> None:
        self.write([row])
        self.finished += 1
        if self.plan.progress_file:
            tag = f"-w{self.worker}" if self.workers > 1 else ""
            Path(self.plan.progress_file + tag).write_text(f"{self.finished}/{self.total} requests")

    # ---- the point --------------------------------------------------------------------------------
    def run(self, start: float | None = None) -> None:
        """Send this worker's share; returns when it is done or the point's time is up."""
        self.start = start if start is not None else time.perf_counter()
        end = self.start + self.plan.max_time_s
        jobs: list[gevent.Greenlet] = []
        try:
            if self.plan.open_loop:
                for i in self.mine:
                    due = self.start + self.plan.offsets[i]
                    if due > end:
                        break
                    wait = due - time.perf_counter()
                    if wait > 0:
                        gevent.sleep(wait)
                    jobs.append(gevent.spawn(self.conversation, i, due))
            else:
                queue = iter(self.mine)
                clients = int(self.plan.value)
                share = clients // self.workers + (self.worker < clients % self.workers)

                stop = self.start + (self.plan.send_until_s or self.plan.max_time_s)

                def slot():
                    for i in queue:  # one iterator for every client: each conversation is taken once
                        if time.perf_counter() >= stop:
                            return
                        self.conversation(i, time.perf_counter())

                jobs = [gevent.spawn(slot) for _ in range(share)]
            gevent.joinall(jobs, timeout=max(0.0, end - time.perf_counter()))
        finally:
            gevent.killall([j for j in jobs if not j.dead], block=True, timeout=10)
            for c in self.idle:
                c.close()
            self.idle = []
