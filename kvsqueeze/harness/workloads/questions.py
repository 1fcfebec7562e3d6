"""``questions``: the W-L sweep's generated retrieval questions (:mod:`kvsqueeze.harness.tasks`) as
single-turn requests with reference answers, so a campaign scores accuracy beside its latencies.

``tasks`` joins task specs with ``+`` (``needle+facts:1250``); ``max_output`` is each request's max
tokens. Questions come from the ``eval`` split, interleaved by task, the same as ``kvsqueeze bench``'s
for the same seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvsqueeze.harness.tasks import DEFAULT_TASKS, make_questions, parse_tasks
from kvsqueeze.harness.workloads import Conversation, Turn, Workload, WorkloadContext, positive


@dataclass(frozen=True)
class Questions(Workload):
    name = "questions"
    tasks: str = "+".join(DEFAULT_TASKS)
    max_output: int = 16

    def __post_init__(self):
        parse_tasks(self.tasks.replace("+", ","))
        positive(self.name, max_output=self.max_output)

    def conversations(self, count: int, ctx: WorkloadContext) -> list[Conversation]:
        tasks = parse_tasks(self.tasks.replace("+", ","))
        qs = make_questions(tasks, math.ceil(count / len(tasks)), ctx.seed)[:count]
        return [Conversation(q.qid, (Turn(q.prompt, self.max_output, None, q.answer, None),), group=q.task)
                for q in qs]
