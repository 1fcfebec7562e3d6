"""A fault campaign against a running server (``kvsqueeze check-server URL``).

What it sends, case by case (every request bounded in count and time; only the given URL is
contacted):

- **bad input**: empty, whitespace-only and over-long prompts, empty and out-of-vocabulary
  ``input_ids``, ids that are not numbers, an empty chat, invalid JSON, a body that is not UTF-8,
  wrong JSON types, unknown fields, absurd ``n``, sampling parameters out of range, huge ``stop`` lists,
  ``logit_bias`` with bad token ids, an oversized body and oversized headers;
- **overload**: a burst of several times what the KV budget holds, long and short prompts mixed;
- **abort storm**: streams dropped at random points, mid-prefill included;
- **slow readers**: streams read one chunk at a time while another request must still finish.

After each case: the server must answer (``/health``), every request must have been answered (2xx) or
refused with a status (4xx, or 503 for a full queue), and once idle, with its prefix cache flushed,
the server must hold no KV (``sglang:num_used_tokens``, and DMS's ``kvsqueeze_dms_held_tokens``); a
server started with SGLang's strict idle check (``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1``, as
``benchmarks/faults.py`` does) stops itself on a leak, which the next check sees.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from kvsqueeze.errors import bad_value
from kvsqueeze.harness.scrape import parse_prometheus

KINDS = ("input", "overload", "abort", "slow")
IDLE_GAUGES = ("sglang:num_used_tokens", "kvsqueeze_dms_held_tokens")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class Outcome:
    status: int | None  # HTTP status, None when no answer came
    error: str = ""
    body: str = ""

    @property
    def kind(self) -> str:
        if self.status is None:
            return "failed"
        if 200 <= self.status < 300:
            return "answered"
        if 400 <= self.status < 500 or self.status == 503:
            return "refused"
        return "failed"


@dataclass
class CaseResult:
    case: str
    kind: str
    tried: int = 0
    answered: int = 0
    refused: int = 0
    failed: int = 0
    dropped: int = 0  # streams the client dropped on purpose (abort storm)
    alive: bool = True
    kv_after_idle: float | None = None  # KV tokens still held once idle and flushed (None: not measured)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.alive and self.failed == 0 and not self.kv_after_idle

    def add(self, outcome: Outcome) -> None:
        self.tried += 1
        k = outcome.kind
        setattr(self, k, getattr(self, k) + 1)
        if k == "failed":
            note = f"status {outcome.status}: {(outcome.error or outcome.body)[:160]}"
            if note not in self.notes:
                self.notes.append(note)


class Target:
    """The server under test: raw HTTP requests (any bytes, any headers) with a timeout."""

    def __init__(self, url: str, timeout: float = 300.0):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise bad_value("url", url, "http://HOST:PORT of a running server")
        self.url, self.host, self.port = url.rstrip("/"), parts.hostname, parts.port or 80
        self.timeout = timeout

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float | None = None) -> Outcome:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            return Outcome(r.status, body=r.read().decode("utf-8", "replace"))
        except (OSError, http.client.HTTPException) as e:
            return Outcome(None, error=f"{type(e).__name__}: {e}")
        finally:
            conn.close()

    def post(self, path: str, payload, timeout: float | None = None) -> Outcome:
        return self.request("POST", path, json.dumps(payload).encode(), timeout=timeout)

    def get_json(self, path: str) -> dict | None:
        out = self.request("GET", path, timeout=30)
        try:
            return json.loads(out.body) if out.status == 200 else None
        except ValueError:
            return None

    def alive(self, wait: float = 120.0) -> bool:
        """The server answers ``/health`` with 200 within ``wait`` seconds. A busy SGLang answers 503
        while its scheduler is behind (its health check generates one token); that is not down, so
        this polls until it answers or ``wait`` runs out."""
        deadline = time.monotonic() + wait
        while True:
            if self.request("GET", "/health", timeout=60).status == 200:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(2.0)

    def metrics(self) -> dict[str, float] | None:
        out = self.request("GET", "/metrics", timeout=30)
        return parse_prometheus(out.body) if out.status == 200 else None

    def stream(self, payload: dict, on_chunk, timeout: float | None = None,
               drop_after: float | None = None) -> Outcome:
        """POST a streaming request; ``on_chunk(i)`` is called per chunk read and returns False to drop
        the connection there; ``drop_after``: drop it after that many seconds whatever came (a drop
        in the middle of the prefill)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)
        timer = None
        try:
            conn.request("POST", "/generate", body=json.dumps({**payload, "stream": True}).encode(),
                         headers={"Content-Type": "application/json"})
            if drop_after is not None:
                def drop(sock=conn.sock):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                timer = threading.Timer(drop_after, drop)
                timer.start()
            r = conn.getresponse()
            if r.status != 200:
                return Outcome(r.status, body=r.read().decode("utf-8", "replace"))
            i = 0
            while True:
                line = r.readline()
                if not line:
                    return Outcome(200)
                if line.startswith(b"data:"):
                    if b"[DONE]" in line:
                        return Outcome(200)
                    if not on_chunk(i):
                        return Outcome(None, error="dropped by the client")
                    i += 1
        except (OSError, http.client.HTTPException) as e:
            if drop_after is not None:
                return Outcome(None, error="dropped by the client")
            return Outcome(None, error=f"{type(e).__name__}: {e}")
        finally:
            if timer is not None:
                timer.cancel()
            conn.close()


def _gen(text=None, ids=None, **sampling):
    body = {"sampling_params": {"max_new_tokens": 4, "temperature": 0, **sampling}}
    if text is not None:
        body["text"] = text
    if ids is not None:
        body["input_ids"] = ids
    return body


class Campaign:
    """The catalogue against one server. ``budget_tokens``: the KV budget the burst overfills (default:
    the server's own ``max_total_num_tokens``)."""

    def __init__(self, url: str, budget_tokens: int | None = None, seed: int = 0, log=print,
                 request_timeout: float = 600.0, busy_wait: float = 120.0, idle_wait: float = 30.0):
        self.t = Target(url, request_timeout)
        self.busy_wait = busy_wait  # how long a server busy after a case may answer /health with 503
        self.idle_wait = idle_wait  # how long KV may take to come back once nothing runs
        self.rng = random.Random(seed)
        self.log = log
        info = self.t.get_json("/server_info") or {}
        self.budget = int(budget_tokens or info.get("max_total_num_tokens") or 4096)
        self.context = int(info.get("context_length") or info.get("max_req_input_len") or 8192)
        self.vocab = None
        model = self.t.get_json("/model_info") or {}
        try:  # the served model's vocabulary, where its config is readable from here
            from pathlib import Path

            cfg = json.loads((Path(model["model_path"]) / "config.json").read_text())
            self.vocab = int(cfg["vocab_size"])
        except (KeyError, OSError, ValueError, TypeError):
            pass

    # ---- checks after a case ---------------------------------------------------------------------
    def idle_kv(self, wait: float | None = None) -> float | None:
        """KV tokens held once nothing runs and the prefix cache is flushed (polled up to ``wait``)."""
        return idle_kv(self.t, self.idle_wait if wait is None else wait)

    def finish(self, res: CaseResult, t0: float) -> CaseResult:
        res.alive = self.t.alive(self.busy_wait)
        res.kv_after_idle = self.idle_kv() if res.alive else None
        res.seconds = round(time.monotonic() - t0, 1)
        self.log(f"  {res.case}: tried {res.tried}, answered {res.answered}, refused {res.refused}, "
                 f"failed {res.failed}" + (f", dropped {res.dropped}" if res.dropped else "")
                 + f", alive {res.alive}, KV after idle {res.kv_after_idle}, {res.seconds} s"
                 + (f" ({'; '.join(res.notes)})" if res.notes else ""))
        return res

    # ---- the catalogue ---------------------------------------------------------------------------
    def bad_inputs(self) -> list[tuple[str, list]]:
        """(case, [(path, body bytes, headers)])"""
        big_id = self.vocab if self.vocab is not None else 2 ** 31
        j = lambda x: json.dumps(x).encode()  # noqa: E731
        long_ids = [100] * (self.context + 16)
        return [
            ("empty text", [("/generate", j(_gen("")), {})]),
            ("whitespace-only text", [("/generate", j(_gen("   \n\t ")), {})]),
            ("empty input_ids", [("/generate", j(_gen(ids=[])), {})]),
            ("token id outside the vocabulary", [("/generate", j(_gen(ids=[1, big_id])), {}),
                                                 ("/generate", j(_gen(ids=[-1, 5])), {})]),
            ("token ids that are not numbers", [("/generate", j(_gen(ids=["a", "b"])), {}),
                                                ("/generate", j(_gen(ids=[1.5, 2])), {})]),
            ("empty prompt in a batch", [("/generate", j({"text": ["Hello", ""],
                                                          "sampling_params": {"max_new_tokens": 2}}), {})]),
            ("empty chat", [("/v1/chat/completions", j({"model": "default", "messages": [], "max_tokens": 4}), {})]),
            ("chat message with empty content", [("/v1/chat/completions", j({
                "model": "default", "messages": [{"role": "user", "content": ""}], "max_tokens": 4}), {})]),
            ("empty completion prompt", [("/v1/completions", j({"model": "default", "prompt": "", "max_tokens": 4}), {})]),
            ("prompt over the context", [("/generate", j(_gen(ids=long_ids)), {})]),
            ("invalid JSON", [("/generate", b'{"text": "Hello", ', {}), ("/v1/completions", b"[[[", {})]),
            ("body not UTF-8", [("/generate", b'{"text": "\xff\xfe\xfd"}', {}),
                                ("/v1/chat/completions", b"\x80\x81\x82", {})]),
            ("wrong JSON types", [("/generate", j({"text": 5}), {}),
                                  ("/generate", j({"text": "Hi", "sampling_params": "fast"}), {}),
                                  ("/generate", j(_gen("Hi", max_new_tokens="ten")), {})]),
            ("unknown fields", [("/generate", j({"text": "Hi", "bogus": 1, "sampling_params": {"max_new_tokens": 2,
                                                                                              "bogus": 2}}), {})]),
            ("absurd n", [("/generate", j(_gen("Hi", n=0)), {}), ("/generate", j(_gen("Hi", n=-3)), {}),
                          ("/generate", j(_gen("Hi", n=100000)), {}),
                          ("/v1/completions", j({"model": "default", "prompt": "Hi", "n": 100000, "max_tokens": 2}), {})]),
            ("sampling parameters out of range", [("/generate", j(_gen("Hi", max_new_tokens=-5)), {}),
                                                  ("/generate", j(_gen("Hi", max_new_tokens=10 ** 12)), {}),
                                                  ("/generate", j(_gen("Hi", temperature=-1)), {}),
                                                  ("/generate", j(_gen("Hi", top_p=3.0)), {}),
                                                  ("/generate", j(_gen("Hi", top_k=-7)), {})]),
            ("huge stop lists", [("/generate", j(_gen("Hi", stop=["x"] * 5000)), {}),
                                 ("/generate", j(_gen("Hi", stop=[""])), {}),
                                 ("/generate", j(_gen("Hi", stop="y" * 100000)), {})]),
            ("logit_bias with bad token ids", [
                ("/v1/completions", j({"model": "default", "prompt": "Hi", "max_tokens": 2,
                                       "logit_bias": {str(big_id): 5}}), {}),
                ("/v1/completions", j({"model": "default", "prompt": "Hi", "max_tokens": 2,
                                       "logit_bias": {"abc": 1}}), {}),
                ("/v1/completions", j({"model": "default", "prompt": "Hi", "max_tokens": 2,
                                       "logit_bias": {"5": 1e30}}), {})]),
            ("oversized body", [("/generate", j(_gen("a " * 4_000_000)), {})]),
            ("oversized headers", [("/generate", j(_gen("Hi")), {"X-Filler": "z" * 70_000})]),
        ]

    def run_inputs(self) -> list[CaseResult]:
        out = []
        for case, reqs in self.bad_inputs():
            t0 = time.monotonic()
            res = CaseResult(case, "input")
            for path, body, headers in reqs:
                res.add(self.t.request("POST", path, body, headers))
            out.append(self.finish(res, t0))
        return out

    def run_overload(self, factor: float = 4.0, max_new: int = 12) -> CaseResult:
        """A burst of requests whose prompts add up to ``factor`` times the KV budget: a third long
        (a third of the budget each, at most half the context), the rest short."""
        t0 = time.monotonic()
        res = CaseResult(f"overload ({factor:g}x the KV budget, mixed)", "overload")
        long_n = max(16, min(self.budget // 3, self.context // 2))
        short_n = 48
        total, prompts = 0, []
        while total < factor * self.budget and len(prompts) < 96:
            n = long_n if len(prompts) % 3 == 0 else short_n
            prompts.append(n)
            total += n
        bodies = [_gen(ids=[self.rng.randrange(100, 5000) for _ in range(n)], max_new_tokens=max_new)
                  for n in prompts]
        with ThreadPoolExecutor(len(bodies)) as ex:
            for o in ex.map(lambda b: self.t.post("/generate", b), bodies):
                res.add(o)
        res.notes.append(f"{len(bodies)} requests, {total} prompt tokens, budget {self.budget}")
        return self.finish(res, t0)

    def run_abort_storm(self, n: int = 16, max_new: int = 64) -> CaseResult:
        """Streams dropped after a random number of chunks; a third after a random 0.05-1 s, in the
        middle of their prefill."""
        t0 = time.monotonic()
        res = CaseResult(f"abort storm ({n} streams dropped at random points)", "abort")
        text = FILLER * 24

        plan = [(self.rng.uniform(0.05, 1.0), None) if i % 3 == 0 else (None, self.rng.randrange(1, max_new))
                for i in range(n)]

        def one(i):
            after, stop_at = plan[i]
            return self.t.stream(_gen(text, max_new_tokens=max_new, ignore_eos=True),
                                 (lambda k: True) if stop_at is None else (lambda k: k < stop_at),
                                 drop_after=after)

        with ThreadPoolExecutor(n) as ex:
            for o in ex.map(one, range(n)):
                if o.error == "dropped by the client":
                    res.tried += 1
                    res.dropped += 1
                else:
                    res.add(o)
        return self.finish(res, t0)

    def run_slow_readers(self, readers: int = 4, pause: float = 0.5, max_new: int = 24) -> CaseResult:
        """Streams read one chunk per ``pause`` seconds; meanwhile a plain request must finish."""
        t0 = time.monotonic()
        res = CaseResult(f"slow readers ({readers} streams, {pause:g} s per chunk)", "slow")
        with ThreadPoolExecutor(readers + 1) as ex:
            slow = [ex.submit(self.t.stream, _gen(FILLER * 4, max_new_tokens=max_new, ignore_eos=True),
                              lambda k: time.sleep(pause) is None) for _ in range(readers)]
            time.sleep(1.0)
            fast = self.t.post("/generate", _gen("Hello, how are", max_new_tokens=4), timeout=120)
            res.add(fast)
            if fast.kind != "answered":
                res.notes.append("a plain request did not finish beside slow readers")
            for f in slow:
                res.add(f.result())
        return self.finish(res, t0)

    def run(self, kinds=KINDS) -> list[CaseResult]:
        for k in kinds:
            if k not in KINDS:
                raise bad_value("cases", k, f"one of {', '.join(KINDS)}")
        if not self.t.alive(wait=5.0):
            raise bad_value("url", self.t.url, "a server that answers /health")
        out = []
        if "input" in kinds:
            out += self.run_inputs()
        if "overload" in kinds:
            out.append(self.run_overload())
        if "abort" in kinds:
            out.append(self.run_abort_storm())
        if "slow" in kinds:
            out.append(self.run_slow_readers())
        return out


def idle_kv(t: Target, wait: float = 30.0) -> float | None:
    """KV tokens a server holds once nothing runs and its prefix cache is flushed (polled up to
    ``wait`` seconds; 0 as soon as it holds none); None if it does not answer ``/metrics``."""
    deadline = time.monotonic() + wait
    held = None
    while time.monotonic() < deadline:
        t.request("POST", "/flush_cache?timeout=60", b"", timeout=120)
        m = t.metrics()
        if m is None:
            return None
        running = m.get("sglang:num_running_reqs", 0) + m.get("sglang:num_queue_reqs", 0)
        held = max(m.get(g, 0.0) for g in IDLE_GAUGES)
        if running == 0 and held == 0:
            return 0.0
        time.sleep(1.0)
    return held


def table(results: list[CaseResult], server: str = "") -> str:
    """A markdown table of a campaign."""
    head = ("| server | case | tried | answered | refused | failed | dropped | alive | KV after idle | s |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    rows = [f"| {server} | {r.case} | {r.tried} | {r.answered} | {r.refused} | {r.failed} | {r.dropped} | "
            f"{'yes' if r.alive else '**no**'} | "
            f"{'–' if r.kv_after_idle is None else f'{r.kv_after_idle:g}'} | {r.seconds:g} |" for r in results]
    return "\n".join([head] + rows)


def to_dicts(results: list[CaseResult]) -> list[dict]:
    return [{**asdict(r), "ok": r.ok} for r in results]
