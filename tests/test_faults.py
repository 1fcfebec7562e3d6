"""The fault campaign's own verdicts, against a small fake server whose faults are planted: a 500 for
an empty prompt, a scheduler that stops answering /health after one request, KV still held when idle.
Every planted fault must be reported, and nothing else (a real SGLang server: tests/test_sglang_e2e.py;
every server kind: benchmarks/faults.py)."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvsqueeze.cli import main
from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.harness import faults


class Fake:
    """What the fake server does: ``empty_text_status`` for ``{"text": ""}``; after a request whose
    text is ``"die"``, /health answers 503 for good; ``held`` KV tokens on /metrics."""

    def __init__(self, empty_text_status=400, held=0.0):
        self.empty_text_status = empty_text_status
        self.held = held
        self.dead = False
        self.seen: list[bytes] = []


@contextmanager
def running(fake: Fake):
    """The fake server on a free port while the block runs; its URL."""
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, status, body=b"{}", ctype="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                return self._send(503 if fake.dead else 200)
            if self.path == "/server_info":
                return self._send(200, json.dumps({"max_total_num_tokens": 512, "context_length": 256}).encode())
            if self.path == "/metrics":
                text = f"sglang:num_used_tokens {fake.held}\nsglang:num_running_reqs 0\nsglang:num_queue_reqs 0\n"
                return self._send(200, text.encode(), "text/plain")
            return self._send(404)

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n)
            fake.seen.append(body)
            if self.path.startswith("/flush_cache"):
                return self._send(200)
            try:
                req = json.loads(body)
            except ValueError:
                return self._send(400)
            if not isinstance(req, dict):
                return self._send(400)
            if req.get("text") == "die":
                fake.dead = True
                return self._send(200)
            if req.get("text") == "":
                return self._send(fake.empty_text_status)
            return self._send(400)  # the fake refuses every other bad input

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()


@pytest.mark.parametrize("status,kind", [(200, "answered"), (204, "answered"), (400, "refused"), (422, "refused"),
                                         (503, "refused"), (500, "failed"), (502, "failed"), (None, "failed")])
def test_an_outcome_is_answered_refused_or_failed(status, kind):
    assert faults.Outcome(status).kind == kind


def test_a_server_that_refuses_every_bad_input_passes_and_one_500_is_reported():
    fake = Fake()
    with running(fake) as url:
        c = faults.Campaign(url, log=lambda m: None)
        assert c.budget == 512 and c.context == 256
        good = c.run(["input"])
        cases = {r.case for r in good}
        assert {"empty text", "body not UTF-8", "oversized headers", "absurd n"} <= cases
        assert all(r.ok and r.failed == 0 and r.alive and r.kv_after_idle == 0 for r in good)
        posted = [b for b in fake.seen if b != b""]  # the flushes after each case have no body
        # every request reached the handler, but the oversized headers (431 from the HTTP layer)
        assert sum(r.tried for r in good) == len(posted) + 1
        fake.empty_text_status = 500
        bad = {r.case: r for r in c.run(["input"])}
        assert not bad["empty text"].ok and bad["empty text"].failed == 1
        assert [k for k, r in bad.items() if not r.ok] == ["empty text"]


def test_kv_held_when_idle_and_a_dead_health_check_are_failures():
    fake = Fake(held=64)
    with running(fake) as url:
        c = faults.Campaign(url, log=lambda m: None, busy_wait=3.0, idle_wait=3.0)
        t0 = time.monotonic()
        r = c.finish(faults.CaseResult("x", "input", tried=1, refused=1), time.monotonic())
        assert r.alive and r.kv_after_idle == 64 and not r.ok  # polled for 3 s, still held
        assert time.monotonic() - t0 >= 3.0
        fake.held = 0
        c.t.post("/generate", {"text": "die"})
        t0 = time.monotonic()
        assert not c.t.alive(wait=3.0) and time.monotonic() - t0 >= 3.0  # polled, then given up
        r = c.finish(faults.CaseResult("y", "input", tried=1, answered=1), time.monotonic())
        assert not r.alive and r.kv_after_idle is None and not r.ok


def test_check_server_prints_the_table_and_exits_1_on_a_failure(capsys):
    fake = Fake(empty_text_status=500)
    with running(fake) as url:
        rc = main(["check-server", url, "--cases", "input", "--label", "fake"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "| fake | empty text | 1 | 0 | 0 | 1 |" in out
    assert "failed: empty text" in out


def test_check_server_refuses_a_bad_url_or_case_quickly(capsys):
    with pytest.raises(KvsqueezeError, match="url='ftp://x': expected http://HOST:PORT"):
        faults.Target("ftp://x")
    t0 = time.monotonic()
    assert main(["check-server", "http://127.0.0.1:9"]) == 2  # nothing listens on port 9
    assert time.monotonic() - t0 < 60
    assert "expected a server that answers /health" in capsys.readouterr().err
    fake = Fake()
    with running(fake) as url:
        assert main(["check-server", url, "--cases", "input,typo"]) == 2
    assert "cases='typo': expected one of input, overload, abort, slow" in capsys.readouterr().err
