"""``shared-prefix``: groups of requests over shared or near-duplicate context.

``kind=system``: every request of a group is one long shared prefix (a ``prefix``-token window of
held-out prose, standing for a system prompt or few-shot context) followed by its own question (a
``question``-token window elsewhere in the text): an exact prefix cache serves the prefix once per
group. The other kinds come from the near-duplicate generator of block fusion's evaluation
(:func:`kvsqueeze.workload.near_duplicate_workload`): ``edits`` (one document with a few word
substitutions per request), ``fewshot`` (one template whose fillers differ), ``chat`` (chats that
differ in their first turn, then paste the same document): requests that share most of their
context but little of an exact prefix, what fusion is for.

``per_group`` requests a group; as many groups as the requests asked need, interleaved round robin
(group 0's first request, group 1's first, ..., then each group's second), so several groups are alive
at once. Max tokens: ``output``. Plain-text prompts (no chat template).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvsqueeze.errors import bad_value
from kvsqueeze.harness.workloads import Conversation, Turn, Workload, WorkloadContext, positive
from kvsqueeze.harness.workloads.synthetic import _prose_ids

KINDS = ("system", "edits", "fewshot", "chat")


@dataclass(frozen=True)
class SharedPrefix(Workload):
    name = "shared-prefix"
    kind: str = "system"
    per_group: int = 8
    prefix: int = 512
    question: int = 32
    output: int = 64
    edits: int = 4

    def __post_init__(self):
        if self.kind not in KINDS:
            raise bad_value(f"{self.name} kind", self.kind, f"one of {', '.join(KINDS)}")
        positive(self.name, per_group=self.per_group, prefix=self.prefix, question=self.question,
                 output=self.output)
        if self.per_group < 2:
            raise bad_value(f"{self.name} per_group", self.per_group, "at least 2 requests a group")

    def conversations(self, count: int, ctx: WorkloadContext) -> list[Conversation]:
        groups = max(1, math.ceil(count / self.per_group))
        need = self.prefix + self.question + self.output + 2
        if need > ctx.context_tokens:
            raise bad_value(f"workload {self.name}", f"prefix={self.prefix},question={self.question},"
                            f"output={self.output}", f"a request within the context ({ctx.context_tokens} tokens)")
        texts = self._system(groups, ctx) if self.kind == "system" else self._neardup(groups, ctx)
        out = []
        for i in range(self.per_group):
            for g in range(groups):
                text = texts[g][i]
                out.append(Conversation(f"{self.kind}-g{g}-r{i}", (Turn(text, self.output, None, None,
                                                                       ctx.count(text)),), group=f"g{g}"))
        return out[:count]

    def _system(self, groups: int, ctx: WorkloadContext) -> list[list[str]]:
        ids = _prose_ids(ctx.tokenizer)
        rng = ctx.rng("shared-prefix")
        tok = ctx.tokenizer

        def window(n):
            at = rng.randrange(0, len(ids) - n)
            return tok.decode(list(ids[at:at + n]))

        out = []
        for _ in range(groups):
            prefix = window(self.prefix)
            out.append([f"{prefix}\n\nQuestion: {window(self.question)}\nAnswer:" for _ in range(self.per_group)])
        return out

    def _neardup(self, groups: int, ctx: WorkloadContext) -> list[list[str]]:
        from kvsqueeze.workload import near_duplicate_workload

        reqs = near_duplicate_workload(ctx.tokenizer, self.kind, groups, self.per_group, self.prefix,
                                       scored_tokens=1, edits=self.edits, seed=ctx.seed)
        out = [[] for _ in range(groups)]
        for r in reqs:
            out[r.group].append(r.text)
        return out
