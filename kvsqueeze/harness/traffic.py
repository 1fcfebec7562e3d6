"""What one campaign point sends (the plan its Locust process reads) and the row it writes per request.

A *point* is one workload at one load (a rate, or a concurrency) against one server. Its plan holds
the conversations it sends (in order), the send offsets of an open-loop schedule
(:mod:`kvsqueeze.harness.arrivals`) or the concurrency of a closed loop, the endpoint, and what the
prompts need: the model's chat template (for chat conversations sent to a text endpoint), the think
time between turns, whose replies go into the history. One row per request (a conversation's turn):
when it was due and sent, whether it succeeded, its timings, its tokens, its prefix-cache hits by
source, and its text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvsqueeze.errors import bad_value
from kvsqueeze.harness.client import ENDPOINTS, RequestResult
from kvsqueeze.harness.tasks import extract_answer
from kvsqueeze.harness.workloads import Conversation, chat_text, messages_for

ROW_FIELDS = ["run", "method", "point", "workload", "load", "value", "worker", "conversation", "turn", "group",
              "phase", "scheduled_s", "sent_s", "lag_s", "start_unix", "ok", "error", "status", "ttft_s", "e2e_s",
              "tpot_s", "itl_s", "output_tokens", "max_tokens", "tokens_source", "prompt_tokens", "cached_tokens",
              "cached_device", "cached_host", "cached_storage", "kv_held_peak_server", "finish_reason",
              "answer", "extracted", "correct", "text"]


@dataclass
class PointPlan:
    url: str
    conversations: list[dict]  # Conversation.to_dict(), in the order they are sent
    endpoint: str = "generate"
    load: str = "poisson"  # arrivals.KINDS
    value: float = 1.0  # requests (conversations) per second, or concurrent clients
    offsets: list[float] = field(default_factory=list)  # open loop: conversation i is due offsets[i] s after the start
    think_s: float = 0.0  # mean think time between a reply and the next turn (exponential; 0: none)
    replies: str = "server"  # what the history holds: the server's replies, or the recorded ones
    warmup_s: float = 0.0  # requests due before this many seconds are warm-up (left out of the figures)
    max_time_s: float = 600.0  # the point ends here; requests still running are recorded as failed
    send_until_s: float | None = None  # closed loop: no conversation starts after this (a duration)
    temperature: float = 0.0
    ignore_eos: bool = True  # every reply takes its max tokens (as SGLang's and vLLM's clients do)
    tokenizer: str = ""  # the model's directory, for the chat template (chat conversations on text endpoints)
    seed: int = 0
    rows_csv: str = "requests.csv"
    progress_file: str = ""
    run: str = "adhoc"
    method: str = "none"
    point: str = ""
    workload: str = ""

    def __post_init__(self):
        if self.endpoint not in ENDPOINTS:
            raise bad_value("endpoint", self.endpoint, f"one of {', '.join(ENDPOINTS)}")
        if self.replies not in ("server", "recorded"):
            raise bad_value("replies", self.replies, "server or recorded")

    @property
    def open_loop(self) -> bool:
        return self.load != "closed"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load_file(cls, path: str | Path) -> "PointPlan":
        return cls(**json.loads(Path(path).read_text()))

    def requests(self) -> int:
        return sum(len(c["turns"]) for c in self.conversations)


class Formatter:
    """Builds each turn's request body: chat messages for the chat endpoint, text for the others
    (chat conversations formatted with the model's chat template: :func:`chat_text`)."""

    def __init__(self, plan: PointPlan):
        self.plan = plan
        self._tok = None

    def template(self, messages: list[dict]) -> str:
        if self._tok is None:
            from transformers import AutoTokenizer

            if not self.plan.tokenizer:
                raise bad_value("tokenizer", "", "the model's directory, to format chat messages as text")
            self._tok = AutoTokenizer.from_pretrained(self.plan.tokenizer)
        return chat_text(self._tok, messages)

    def body(self, conv: Conversation, k: int, replies: list[str]) -> tuple[dict, str]:
        """(request body, the prompt as text or JSON messages, for the record)."""
        from kvsqueeze.harness.client import build_body

        p = self.plan
        turn = conv.turns[k]
        if conv.chat:
            msgs = messages_for(conv, k, replies)
        else:
            msgs = ([{"role": "system", "content": conv.system}] if conv.system else []) + \
                   [{"role": "user", "content": turn.user}]
        if p.endpoint == "chat":
            return build_body("chat", "", 1, turn.max_tokens, p.temperature, seed=None, ignore_eos=p.ignore_eos,
                              messages=msgs), json.dumps(msgs)
        text = self.template(msgs) if conv.chat else turn.user
        return build_body(p.endpoint, text, 1, turn.max_tokens, p.temperature, ignore_eos=p.ignore_eos), text


def read_rows(point_dir: Path) -> list[dict]:
    """Every row a point wrote (``requests.csv``, and ``requests-w<k>.csv`` of Locust workers)."""
    import csv

    rows = []
    for p in sorted(Path(point_dir).glob("requests*.csv")):
        with open(p, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def row_for(plan: PointPlan, conv: Conversation, k: int, worker: int, scheduled: float, start_perf: float,
            res: RequestResult | None, error: str = "") -> dict:
    """One request's row. ``scheduled`` and ``res.sent_perf`` are perf_counter times; offsets in the
    row count from ``start_perf``, the point's start. ``res`` None: a request that never finished
    (``error`` says why)."""
    turn = conv.turns[k]
    s = res.samples[0] if res is not None and res.samples else None
    ok = res is not None and res.ok
    sent = res.sent_perf - start_perf if res is not None else None
    details = (s.cached_details or {}) if s else {}
    text = s.text if s else ""
    extracted = extract_answer(text) if ok and turn.answer is not None else None
    gaps = s.gaps_s if s else []
    return {
        "run": plan.run, "method": plan.method, "point": plan.point, "workload": plan.workload,
        "load": plan.load, "value": plan.value, "worker": worker, "conversation": conv.cid, "turn": k,
        "group": conv.group,
        "phase": "warmup" if scheduled - start_perf < plan.warmup_s else "measured",
        "scheduled_s": round(scheduled - start_perf, 6), "sent_s": None if sent is None else round(sent, 6),
        "lag_s": None if sent is None else round(sent - (scheduled - start_perf), 6),
        "start_unix": f"{res.start_unix:.6f}" if res is not None else "", "ok": int(ok),
        "error": (res.error if res is not None else error)[:500], "status": res.status if res is not None else None,
        "ttft_s": s.ttft_s if s else None, "e2e_s": s.e2e_s if s else None, "tpot_s": s.tpot_s if s else None,
        "itl_s": json.dumps([round(g, 6) for g in gaps]), "output_tokens": s.output_tokens if s else None,
        "max_tokens": turn.max_tokens, "tokens_source": s.tokens_source if s else "",
        "prompt_tokens": s.prompt_tokens if s else None, "cached_tokens": s.cached_tokens if s else None,
        "cached_device": details.get("device"), "cached_host": details.get("host"),
        "cached_storage": details.get("storage"), "kv_held_peak_server": s.kv_tokens_held_peak if s else None,
        "finish_reason": s.finish_reason if s else None, "answer": turn.answer,
        "extracted": extracted, "correct": (int(extracted == turn.answer or text.strip() == turn.answer)
                                            if turn.answer is not None and ok else None),
        "text": text,
    }
