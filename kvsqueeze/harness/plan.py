"""What one load run does (the plan a Locust process reads) and the per-sample rows it writes.

``kvsqueeze bench`` writes one plan per configuration and points the Locust process at it through
``KVSQUEEZE_BENCH_PLAN``; plain ``locust -f kvsqueeze/harness/locustfile.py`` without that variable
uses ``default_plan()``: the embedded tasks, W=1, L=64, SGLang's native endpoint.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvsqueeze.errors import bad_value
from kvsqueeze.harness.client import ENDPOINTS, RequestResult
from kvsqueeze.harness.tasks import Question, extract_answer, make_questions

MODES = ("n", "concurrent")

ROW_FIELDS = ["run", "method", "config", "endpoint", "mode", "W", "L", "group", "qid", "task",
              "answer", "sample", "start_unix", "ok", "error", "ttft_s", "e2e_s", "tpot_s",
              "gap_mean_s", "gap_p99_s", "gaps_s", "output_tokens", "tokens_source",
              "prompt_tokens", "cached_tokens", "kv_token_reads_server", "kv_held_peak_server",
              "kv_shared_server", "finish_reason", "extracted", "correct", "phase", "text"]


@dataclass
class Plan:
    url: str
    W: int = 1
    L: int = 64
    mode: str = "n"
    endpoint: str = "generate"
    temperature: float = 0.7
    questions: list[dict] = field(default_factory=list)
    requests_csv: str = "requests.csv"
    run: str = "adhoc"
    method: str = "none"
    config: str = ""
    users: int = 2
    progress_file: str | None = None
    ignore_eos: bool = False  # every sample generates L tokens (as benchmark clients do)
    phase: str = ""  # "pilot" (measures a question's KV peak) or "batch" (at the maximum batch), or ""

    def __post_init__(self):
        if not isinstance(self.W, int) or self.W < 1:
            raise bad_value("W", self.W, "a number of parallel samples >= 1")
        if not isinstance(self.L, int) or self.L < 1:
            raise bad_value("L", self.L, "a maximum number of generated tokens >= 1")
        if self.mode not in MODES:
            raise bad_value("mode", self.mode, f"one of {', '.join(MODES)}")
        if self.endpoint not in ENDPOINTS:
            raise bad_value("endpoint", self.endpoint, f"one of {', '.join(ENDPOINTS)}")
        if not self.config:
            self.config = config_label(self.method, self.W, self.L, self.mode, self.endpoint)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls(**json.loads(Path(path).read_text()))


def config_label(method: str, W: int, L: int, mode: str, endpoint: str) -> str:
    return f"{method}|W={W}|L={L}|{mode}|{endpoint}"


def default_plan() -> Plan:
    qs = make_questions(["passkey", "lookup", "arithmetic"], per_task=4)
    return Plan(url=os.environ.get("KVSQUEEZE_BENCH_URL", "http://127.0.0.1:30000"),
                questions=[q.to_dict() for q in qs])


def plan_from_env() -> Plan:
    path = os.environ.get("KVSQUEEZE_BENCH_PLAN")
    return Plan.load(path) if path else default_plan()


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(0.99 * (len(v) - 1))))]


def rows_for(plan: Plan, q: Question | dict, group: str, results: list[RequestResult]) -> list[dict]:
    """One row per sample. With mode ``concurrent`` each result holds one sample; with ``n``, W."""
    q = q if isinstance(q, dict) else q.to_dict()
    rows = []
    k = 0
    for res in results:
        for s in res.samples:
            extracted = extract_answer(s.text) if res.ok else None
            gaps = s.gaps_s
            rows.append({
                "run": plan.run, "method": plan.method, "config": plan.config,
                "endpoint": plan.endpoint, "mode": plan.mode, "W": plan.W, "L": plan.L,
                "group": group, "qid": q["qid"], "task": q["task"], "answer": q["answer"],
                "sample": k, "start_unix": f"{res.start_unix:.6f}", "ok": int(res.ok),
                "error": res.error, "ttft_s": s.ttft_s, "e2e_s": s.e2e_s, "tpot_s": s.tpot_s,
                "gap_mean_s": sum(gaps) / len(gaps) if gaps else None, "gap_p99_s": _p99(gaps),
                "gaps_s": json.dumps([round(g, 6) for g in gaps]),
                "output_tokens": s.output_tokens, "tokens_source": s.tokens_source,
                "prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens,
                "kv_token_reads_server": s.kv_token_reads, "kv_held_peak_server": s.kv_tokens_held_peak,
                "kv_shared_server": s.kv_tokens_prefix_shared,
                "finish_reason": s.finish_reason, "extracted": extracted,
                "correct": int(extracted == q["answer"]), "phase": plan.phase, "text": s.text,
            })
            k += 1
    return rows


class RowWriter:
    """Appends rows to a CSV file, flushing each batch (a killed run keeps what it wrote)."""

    def __init__(self, path: str | Path, fields: list[str] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._f = open(self.path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=fields or ROW_FIELDS)
        if new:
            self._w.writeheader()
        self.count = 0

    def write(self, rows: list[dict]) -> None:
        self._w.writerows(rows)
        self._f.flush()
        self.count += len(rows)

    def close(self) -> None:
        self._f.close()
