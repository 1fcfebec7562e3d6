"""``jsonl``: a user's own requests, one JSON object a line.

Each line is ``{"prompt": "..."}`` (plain text, sent as it is) or ``{"messages": [{"role": ...,
"content": ...}, ...]}`` (chat messages ending with a user message; the chat template formats them where
an endpoint takes text), with optional ``"max_tokens"`` (default: the workload's ``max_output``) and
``"answer"`` (a reference the reply is scored against: the reply's first run of digits, or its text,
must equal it). Blank lines and lines starting with ``#`` are skipped. Every line is checked before
anything starts; a bad one is reported with its line number. Lines are used in file order; a
campaign that needs more requests than the file holds stops with an error before it starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.harness.workloads import Conversation, Turn, Workload, WorkloadContext, positive, too_few

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class JSONL(Workload):
    name = "jsonl"
    path: str = ""
    max_output: int = 128

    def __post_init__(self):
        if not self.path:
            raise bad_value("workload jsonl path", self.path, "a file of one JSON request a line (jsonl:path=FILE)")
        positive(self.name, max_output=self.max_output)

    def read(self) -> list[Conversation]:
        p = Path(self.path)
        if not p.is_file():
            raise bad_value("workload jsonl path", self.path, "an existing file of one JSON request a line")
        out = []
        for no, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            out.append(self._line(no, line))
        if not out:
            raise bad_value("workload jsonl path", self.path, "at least one request line")
        return out

    def _line(self, no: int, line: str) -> Conversation:
        where = f"{self.path}:{no}"

        def bad(what, value, expected):
            return KvsqueezeError(f"{where}: {what}={value!r}: expected {expected}")

        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise bad("line", line[:80], f"one JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise bad("line", line[:80], "a JSON object")
        unknown = set(obj) - {"prompt", "messages", "max_tokens", "answer"}
        if unknown:
            raise bad("key", sorted(unknown)[0], "only prompt, messages, max_tokens, answer")
        if ("prompt" in obj) == ("messages" in obj):
            raise bad("request", line[:80], "exactly one of prompt or messages")
        mt = obj.get("max_tokens", self.max_output)
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            raise bad("max_tokens", mt, "a whole number >= 1")
        answer = obj.get("answer")
        if answer is not None and not isinstance(answer, (str, int)):
            raise bad("answer", answer, "a string or a number")
        answer = None if answer is None else str(answer)
        cid = f"jsonl-{no}"
        if "prompt" in obj:
            if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
                raise bad("prompt", obj["prompt"], "non-empty text")
            return Conversation(cid, (Turn(obj["prompt"], mt, None, answer),))
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise bad("messages", msgs, "a non-empty list of {role, content} objects")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise bad("message", m, f"an object with role one of {', '.join(ROLES)} and text content")
        if msgs[-1]["role"] != "user":
            raise bad("messages", msgs[-1]["role"], "a last message from the user")
        history = tuple({"role": m["role"], "content": m["content"]} for m in msgs[:-1])
        return Conversation(cid, (Turn(msgs[-1]["content"], mt, None, answer),), chat=True, history=history)

    def conversations(self, count: int, ctx: WorkloadContext) -> list[Conversation]:
        convs = self.read()
        if len(convs) < count:
            raise too_few(f"jsonl ({self.path})", len(convs), count, "request lines")
        return convs[:count]
