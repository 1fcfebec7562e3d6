"""One streaming generation request, timed per sample: OpenAI-compatible and SGLang-native endpoints.

The definitions of every figure are in ``docs/metrics.md``. In short, for each sample (each of the
``n`` choices of a request, timed on its own):

- ``ttft_s``: request sent -> first chunk that carries generated text of that sample;
- ``gaps_s``: times between consecutive text-carrying chunks of that sample (what some tools call
  inter-token latency; a chunk may carry several tokens);
- ``e2e_s``: request sent -> that sample's last chunk (the one with its finish reason);
- ``tpot_s``: ``(e2e_s - ttft_s) / (output_tokens - 1)``, with ``output_tokens`` from the server's
  usage figures, never from the number of chunks.

Plain ``http.client`` over one keep-alive connection: it is cooperative under Locust's gevent patching
and adds little time of its own (measured by ``benchmarks/harness_overhead.py``).
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from kvsqueeze.errors import bad_value

ENDPOINTS = {"generate": "/generate", "completions": "/v1/completions",
             "chat": "/v1/chat/completions"}


@dataclass
class Sample:
    """One generated sequence of a request."""

    index: int
    first_s: float | None = None  # seconds after the request was sent
    chunk_s: list[float] = field(default_factory=list)
    text: str = ""
    output_tokens: int | None = None
    tokens_source: str = ""  # "usage" (per sample), "usage_total" (request total, n=1), "chunks"
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    cached_details: dict | None = None  # SGLang's split of cached_tokens: device / host / storage
    kv_token_reads: int | None = None  # where the server reports it (meta_info)
    kv_tokens_held_peak: int | None = None
    kv_tokens_prefix_shared: int | None = None  # of those, taken from the server's prefix cache
    finish_reason: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def ttft_s(self) -> float | None:
        return self.first_s

    @property
    def e2e_s(self) -> float | None:
        return self.chunk_s[-1] if self.chunk_s else None

    @property
    def gaps_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:])]

    @property
    def tpot_s(self) -> float | None:
        n = self.output_tokens
        if n is None or n < 2 or self.first_s is None:
            return None
        return (self.e2e_s - self.first_s) / (n - 1)


KV_FIGURES = ("kv_token_reads", "kv_tokens_held_peak", "kv_tokens_prefix_shared")


def server_kv_figures(meta: dict) -> dict[str, int]:
    """The per-request KV figures a server reports in ``meta_info``: at its top level, or inside a
    kvsqueeze method's entry (``meta_info["kvsqueeze_dms"] = [{...}]``, SGLang's customized-info
    channel, which wraps each value in a list)."""
    out = {k: int(meta[k]) for k in KV_FIGURES if k in meta}
    for key, value in meta.items():
        entry = value[0] if isinstance(value, list) and value else value
        if key.startswith("kvsqueeze") and isinstance(entry, dict):
            out.update({k: int(entry[k]) for k in KV_FIGURES if k in entry})
    return out


@dataclass
class RequestResult:
    endpoint: str
    n: int
    start_unix: float
    samples: list[Sample]
    sent_perf: float = 0.0  # time.perf_counter() when the request was sent: every *_s figure counts from it
    ok: bool = True
    error: str = ""
    status: int | None = None
    total_s: float | None = None
    usage: dict | None = None


def build_body(endpoint: str, prompt: str, n: int, max_tokens: int, temperature: float,
               model: str = "default", seed: int | None = None, ignore_eos: bool = False,
               messages: list[dict] | None = None) -> dict:
    """The streaming request body of one endpoint. ``messages`` (chat endpoint only) replaces the one
    user message ``prompt`` would make."""
    if endpoint not in ENDPOINTS:
        raise bad_value("endpoint", endpoint, f"one of {', '.join(ENDPOINTS)}")
    if endpoint == "generate":
        sp = {"max_new_tokens": max_tokens, "n": n, "temperature": temperature}
        if seed is not None:
            sp["sampling_seed"] = seed
        if ignore_eos:
            sp["ignore_eos"] = True
        return {"text": prompt, "sampling_params": sp, "stream": True}
    body = {"model": model, "max_tokens": max_tokens, "n": n, "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if seed is not None:
        body["seed"] = seed
    if ignore_eos:  # SGLang's extra sampling parameter on its OpenAI endpoints
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = messages or [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


class StreamParser:
    """Turns the decoded SSE events of one request into per-sample timings and token counts."""

    def __init__(self, endpoint: str, n: int):
        self.endpoint = endpoint
        self.samples = [Sample(i) for i in range(n)]
        self.usage: dict | None = None
        self.error: str = ""

    def _sample(self, index) -> Sample:
        index = int(index or 0)
        if not 0 <= index < len(self.samples):
            raise ValueError(f"stream chunk for sample {index}, but the request asked for "
                             f"{len(self.samples)}")
        return self.samples[index]

    def feed(self, event: dict, t: float) -> None:
        if "error" in event:
            err = event["error"]
            self.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            return
        if self.endpoint == "generate":
            self._feed_generate(event, t)
        else:
            self._feed_openai(event, t)

    def _mark(self, s: Sample, t: float, new_text: str) -> None:
        if not new_text:
            return
        if s.first_s is None:
            s.first_s = t
        s.chunk_s.append(t)

    def _feed_generate(self, event: dict, t: float) -> None:
        s = self._sample(event.get("index", 0))
        text = event.get("text", "")
        # SGLang's native stream sends the cumulative text; tolerate an incremental server too.
        new = text[len(s.text):] if text.startswith(s.text) else text
        self._mark(s, t, new)
        s.text = text if text.startswith(s.text) else s.text + text
        meta = event.get("meta_info") or {}
        if "completion_tokens" in meta:
            s.output_tokens, s.tokens_source = int(meta["completion_tokens"]), "usage"
        s.prompt_tokens = meta.get("prompt_tokens", s.prompt_tokens)
        s.cached_tokens = meta.get("cached_tokens", s.cached_tokens)
        if isinstance(meta.get("cached_tokens_details"), dict):
            s.cached_details = meta["cached_tokens_details"]
        for key, value in server_kv_figures(meta).items():
            setattr(s, key, value)
        fr = meta.get("finish_reason")
        if fr:
            s.finish_reason = fr.get("type", str(fr)) if isinstance(fr, dict) else str(fr)
        s.meta = {k: v for k, v in meta.items() if k.startswith("kvsqueeze")} or s.meta

    def _feed_openai(self, event: dict, t: float) -> None:
        choices = event.get("choices") or []
        usage = event.get("usage")
        if not choices and usage:  # the final usage chunk: totals over all samples
            self.usage = usage
            return
        for ch in choices:
            s = self._sample(ch.get("index", 0))
            if self.endpoint == "chat":
                new = (ch.get("delta") or {}).get("content") or ""
            else:
                new = ch.get("text") or ""
            self._mark(s, t, new)
            s.text += new
            if ch.get("finish_reason"):
                s.finish_reason = ch["finish_reason"]
            if usage:  # continuous usage: this choice's own counts
                s.output_tokens = int(usage.get("completion_tokens", 0))
                s.tokens_source = "usage"
                s.prompt_tokens = usage.get("prompt_tokens", s.prompt_tokens)
                details = usage.get("prompt_tokens_details") or {}
                s.cached_tokens = details.get("cached_tokens", s.cached_tokens)

    def finish(self) -> None:
        """Fill in token counts the stream did not give per sample."""
        total = (self.usage or {}).get("completion_tokens")
        for s in self.samples:
            if s.output_tokens is not None:
                continue
            if total is not None and len(self.samples) == 1:
                s.output_tokens, s.tokens_source = int(total), "usage_total"
            else:
                s.output_tokens, s.tokens_source = len(s.chunk_s), "chunks"
        if self.usage and len(self.samples) == 1:
            s = self.samples[0]
            s.prompt_tokens = self.usage.get("prompt_tokens", s.prompt_tokens)
            details = self.usage.get("prompt_tokens_details") or {}
            s.cached_tokens = details.get("cached_tokens", s.cached_tokens)


def iter_sse(resp):
    """Yield (arrival time, decoded JSON) per ``data:`` event of a streaming HTTP response."""
    while True:
        line = resp.readline()
        if not line:
            return
        t = time.perf_counter()
        line = line.strip()
        if not line:
            continue
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        yield t, json.loads(payload)


class Client:
    """A keep-alive HTTP connection to one server; ``stream`` runs one timed request."""

    def __init__(self, url: str, timeout: float = 600.0):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise bad_value("url", url, "an http://host:port URL")
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def stream(self, endpoint: str, body: dict) -> RequestResult:
        """One timed request. A kept-alive connection the server closed while it sat idle (uvicorn
        closes them after 5 s) fails before any answer comes: then the request is sent once more on a
        new connection, its clock started again (what HTTP clients do for a stale pooled connection)."""
        reused = self.conn is not None
        result = self._stream_once(endpoint, body)
        if reused and not result.ok and result.status is None and result.error.startswith(STALE):
            result = self._stream_once(endpoint, body)
        return result

    def _stream_once(self, endpoint: str, body: dict) -> RequestResult:
        n = int((body.get("sampling_params") or body).get("n", 1))
        parser = StreamParser(endpoint, n)
        start_unix = time.time()
        t0 = time.perf_counter()
        result = RequestResult(endpoint, n, start_unix, parser.samples, sent_perf=t0)
        data = json.dumps(body).encode()
        try:
            conn = self._connection()
            conn.request("POST", ENDPOINTS[endpoint], body=data,
                         headers={"Content-Type": "application/json",
                                  "Accept": "text/event-stream"})
            resp = conn.getresponse()
            result.status = resp.status
            if resp.status != 200:
                detail = resp.read()[:300].decode("utf-8", "replace")
                raise RuntimeError(f"HTTP {resp.status}: {detail}")
            for t, event in iter_sse(resp):
                parser.feed(event, t - t0)
            resp.read()  # the rest of the body (chunked terminator), so the connection is reusable
            if parser.error:
                raise RuntimeError(f"server error in stream: {parser.error}")
            if any(s.finish_reason is None for s in parser.samples):
                raise RuntimeError("stream ended before every sample finished")
        except Exception as e:  # noqa: BLE001 - every failure is recorded, none is fatal to a run
            result.ok = False
            result.error = f"{type(e).__name__}: {e}"[:500]
            self.close()
        parser.finish()
        result.usage = parser.usage
        result.total_s = time.perf_counter() - t0
        return result


# errors of a request on a kept-alive connection the server had closed (no answer came)
STALE = ("BrokenPipeError", "ConnectionResetError", "RemoteDisconnected", "ConnectionAbortedError")
