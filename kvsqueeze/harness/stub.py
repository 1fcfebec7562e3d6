"""A scripted streaming server with known timings, for testing and benchmarking the harness itself.

It speaks the three endpoints the harness drives (``/generate``, ``/v1/completions``,
``/v1/chat/completions``) with SGLang's stream shapes, plus ``/metrics`` (Prometheus text),
``/model_info`` and ``/health``. Every sample's first chunk is sent ``ttft`` seconds after the request
arrived and each following chunk ``gap`` seconds after the previous one, one token per chunk, ``tokens``
tokens per sample (capped by the request's max tokens). The text of sample ``i`` answers with
``answer`` (default: the first number of the prompt, so some tasks score) followed by filler words.
``die_after`` makes it stop answering after that many requests (a server that dies mid-run).
``slots`` bounds the requests it serves at once: the others wait their turn, and a request's timings
start when it gets a slot. Each request holds its slot ``ttft + (tokens - 1) * gap`` seconds, so the
stub serves ``slots / that`` requests per second and no more: below that rate of evenly spaced
arrivals nothing waits, above it the queue (and the TTFT) grows with every request.

It keeps its own record of every generation request (:class:`StreamRecord`, ``GET /stub/log``): when
the request arrived and when each chunk was handed to the socket, on this machine's monotonic clock
(``time.perf_counter``, the clock the client times with). Tests of the harness's timing compare the
client's figures with these records rather than with the script, so a late stub on a busy machine
does not fail them: what the client adds (the receive path) is what they bound.

Run it with ``python -m kvsqueeze.harness.stub --port 8123 --ttft 0.05 --gap 0.01``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field


@dataclass
class StreamRecord:
    """One generation request as the stub served it: ``arrival`` (its body read) and ``writes`` (one
    time per step, taken just before that step's chunks were written: a client cannot receive a
    chunk earlier), ``perf_counter`` seconds; ``n`` chunks were written per step."""

    path: str
    prompt: str
    n: int
    arrival: float
    writes: list[float] = field(default_factory=list)
    finished: float | None = None


class StubConfig:
    """``budget``: the KV tokens the stub says it holds (``sglang:max_total_num_tokens``) and, unless
    ``real_budget`` says otherwise, what it really holds: a request whose KV at its peak does not fit
    beside the running ones counts as retracted (``sglang:num_retracted_requests_total``; it is served
    all the same). A request's peak: the prompt once plus every sample's stored tokens (a prefix cache
    shared by its samples), or with ``kv_ratio`` (a DMS-like server) each sample's own prompt and
    tokens over the ratio, reported per sample in ``meta_info["kvsqueeze_dms"]`` as
    ``kv_tokens_held_peak`` (slots: tokens x layers x KV heads) and ``kv_token_reads``."""

    def __init__(self, ttft: float = 0.05, gap: float = 0.01, tokens: int = 8,
                 answer: str | None = None, die_after: int | None = None,
                 layers: int = 30, kv_heads: int = 3, budget: int = 1_000_000,
                 real_budget: int | None = None, kv_ratio: float | None = None, slots: int | None = None,
                 idle_close: float | None = None):
        self.ttft, self.gap, self.tokens = ttft, gap, tokens
        self.answer, self.die_after = answer, die_after
        self.layers, self.kv_heads = layers, kv_heads
        self.budget, self.real_budget, self.kv_ratio = budget, real_budget or budget, kv_ratio
        self.slots = slots
        self.idle_close = idle_close  # close a kept-alive connection idle this long (uvicorn: 5 s)

    @property
    def capacity_rps(self) -> float | None:
        """Requests per second it serves at most (with ``slots``) at ``tokens`` tokens a request."""
        return self.slots / (self.ttft + (self.tokens - 1) * self.gap) if self.slots else None


class StubServer:
    def __init__(self, config: StubConfig, host: str = "127.0.0.1", port: int = 0):
        self.config, self.host, self.port = config, host, port
        self.requests = 0
        self.running = 0
        self.peak_running = 0
        self.generated = 0
        self.reserved = 0.0  # KV tokens the running requests hold at their peaks
        self.retracted = 0
        self.peak_questions = 0  # most requests running at once
        self._requests_running = 0
        self.log: list[StreamRecord] = []
        self._slots: asyncio.Semaphore | None = None
        self._server = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- HTTP plumbing -------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.config.idle_close)
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v.strip() for k, v in
                           (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                t_arrival = time.perf_counter()
                if not await self._route(method, path, body, writer, t_arrival):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            pass
        finally:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def _send(self, writer, status: int, payload: bytes, ctype: str) -> None:
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        await writer.drain()

    async def _route(self, method, path, body, writer, t_arrival) -> bool:
        cfg = self.config
        if method == "GET" and path in ("/health", "/model_info"):
            await self._send(writer, 200, json.dumps({"model_path": "stub"}).encode(),
                             "application/json")
            return True
        if method == "GET" and path == "/stub/log":
            await self._send(writer, 200, json.dumps([asdict(r) for r in self.log]).encode(),
                             "application/json")
            return True
        if method == "GET" and path == "/metrics":
            text = (f"# TYPE sglang:num_running_reqs gauge\n"
                    f'sglang:num_running_reqs{{model_name="stub"}} {self.running}\n'
                    f'sglang:num_used_tokens{{model_name="stub"}} {self.running * 100}\n'
                    f'sglang:generation_tokens_total{{model_name="stub"}} {self.generated}\n'
                    f'sglang:max_total_num_tokens{{model_name="stub"}} {cfg.budget}\n'
                    f'sglang:num_retracted_requests_total{{model_name="stub"}} {self.retracted}\n')
            await self._send(writer, 200, text.encode(), "text/plain")
            return True
        if method != "POST" or path not in ("/generate", "/v1/completions",
                                            "/v1/chat/completions"):
            await self._send(writer, 404, b'{"error": "not found"}', "application/json")
            return True
        self.requests += 1
        if cfg.die_after is not None and self.requests > cfg.die_after:
            if os.environ.get("KVSQUEEZE_STUB_SUBPROCESS"):
                os._exit(3)  # the whole server dies, as a crashed engine would
            writer.close()
            return False
        req = json.loads(body or b"{}")
        if self._slots is None and cfg.slots:
            self._slots = asyncio.Semaphore(cfg.slots)
        if self._slots is not None:
            async with self._slots:  # waits for a free slot; the timings start once it has one
                await self._stream(path, req, writer, t_arrival, time.perf_counter())
        else:
            await self._stream(path, req, writer, t_arrival, t_arrival)
        return True

    async def _stream(self, path, req, writer, t_arrival, t_served) -> None:
        cfg = self.config
        native = path == "/generate"
        sp = req.get("sampling_params", {}) if native else req
        n = int(sp.get("n", 1))
        max_tok = int(sp.get("max_new_tokens" if native else "max_tokens", cfg.tokens))
        k = max(1, min(cfg.tokens, max_tok))
        prompt = req.get("text") or req.get("prompt") or \
            " ".join(m.get("content", "") for m in req.get("messages", []))
        m = re.search(r"\d+", prompt or "")
        answer = cfg.answer if cfg.answer is not None else (m.group(0) if m else "0")
        words = [" " + answer] + [" ok"] * (k - 1)
        prompt_tokens = len((prompt or "").split())
        record = StreamRecord(path, prompt or "", n, t_arrival)
        self.log.append(record)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        self.running += n
        self.peak_running = max(self.peak_running, self.running)
        stored = k - 1  # the last sampled token is never stored
        if cfg.kv_ratio:
            peak = n * (prompt_tokens + stored) / cfg.kv_ratio
        else:
            peak = prompt_tokens + n * stored
        if self.reserved + peak > cfg.real_budget + 1e-6:
            self.retracted += 1
        self.reserved += peak
        self._requests_running += 1
        self.peak_questions = max(self.peak_questions, self._requests_running)
        extra = None
        if cfg.kv_ratio:
            slots = cfg.layers * cfg.kv_heads
            extra = {"kv_tokens_held_peak": int(round((prompt_tokens + stored) / cfg.kv_ratio * slots)),
                     "kv_token_reads": int(sum((prompt_tokens + t) / cfg.kv_ratio for t in range(1, k)) * slots)}

        def event(obj) -> bytes:
            data = b"data: " + json.dumps(obj).encode() + b"\n\n"
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        try:
            for step in range(k):
                due = t_served + cfg.ttft + step * cfg.gap
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                last = step == k - 1
                record.writes.append(time.perf_counter())
                for i in range(n):
                    self.generated += 1
                    writer.write(event(self._chunk(path, i, words, step, last, prompt_tokens,
                                                   extra if last else None)))
                await writer.drain()
            if not native:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": k * n,
                         "total_tokens": prompt_tokens + k * n}
                writer.write(event({"choices": [], "usage": usage}))
            done = b"data: [DONE]\n\n"
            writer.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
            await writer.drain()
            record.finished = time.perf_counter()
        finally:
            self.running -= n
            self.reserved -= peak
            self._requests_running -= 1

    @staticmethod
    def _chunk(path, i, words, step, last, prompt_tokens, extra=None) -> dict:
        fr = "length" if last else None
        if path == "/generate":
            meta = {"id": f"r{i}", "prompt_tokens": prompt_tokens, "completion_tokens": step + 1,
                    "cached_tokens": 0,
                    "finish_reason": {"type": "length", "length": step + 1} if last else None}
            if extra:
                meta["kvsqueeze_dms"] = [extra]
            return {"text": "".join(words[:step + 1]), "index": i, "meta_info": meta}
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": step + 1,
                 "total_tokens": prompt_tokens + step + 1}
        if path == "/v1/chat/completions":
            ch = {"index": i, "delta": {"content": words[step]}, "finish_reason": fr}
        else:
            ch = {"index": i, "text": words[step], "finish_reason": fr}
        return {"choices": [ch], "usage": usage}

    # ---- lifecycle -----------------------------------------------------------------------
    async def _serve(self, started: threading.Event) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        started.set()
        async with self._server:
            await self._server.serve_forever()

    def start(self) -> "StubServer":
        """Serve from a background thread (for tests); returns once it listens."""
        started = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run():
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._serve(started))
            except (asyncio.CancelledError, RuntimeError):
                pass

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the stub server did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._server:
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(5)

    def record(self, prompt: str) -> StreamRecord:
        """The one request this stub served with ``prompt`` (tests give each request its own)."""
        found = [r for r in self.log if r.prompt == prompt]
        if len(found) != 1:
            raise LookupError(f"{len(found)} requests with prompt {prompt!r}, expected one")
        return found[0]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--ttft", type=float, default=0.05)
    p.add_argument("--gap", type=float, default=0.01)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--answer", default=None)
    p.add_argument("--die-after", type=int, default=None)
    p.add_argument("--budget", type=int, default=1_000_000)
    p.add_argument("--slots", type=int, default=None, help="requests served at once (the rest wait)")
    a = p.parse_args(argv)
    os.environ["KVSQUEEZE_STUB_SUBPROCESS"] = "1"
    srv = StubServer(StubConfig(a.ttft, a.gap, a.tokens, a.answer, a.die_after, budget=a.budget, slots=a.slots),
                     a.host, a.port)
    print(f"stub server on http://{a.host}:{a.port}", flush=True)
    started = threading.Event()
    try:
        asyncio.run(srv._serve(started))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
