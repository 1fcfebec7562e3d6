"""A real SGLang server on CPU with the embedded model, started the way `kvsqueeze serve` starts it."""

import json
import os
import urllib.request

import pytest

from kvsqueeze.backends.sglang.server import SGLangServer, free_port
from kvsqueeze.model import resolve_model

pytestmark = pytest.mark.slow


def post(url, payload, timeout=300):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("sglang") / "server.log"
    srv = SGLangServer(model=resolve_model(None), port=free_port(), log_path=log)
    srv.start()
    try:
        srv.wait_ready(timeout=400)
    except Exception:
        srv.stop()
        print(log.read_text()[-5000:])
        raise
    yield srv
    pid = srv.proc.pid
    srv.stop()
    with pytest.raises(ProcessLookupError):  # the whole process group is gone
        os.killpg(pid, 0)


def test_generate_answers(server):
    out = post(server.url + "/generate", {"text": "The capital of France is",
                                          "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    assert "Paris" in out["text"]
    assert out["meta_info"]["completion_tokens"] >= 1


def test_chat_completions_answer(server):
    out = post(server.url + "/v1/chat/completions", {
        "model": "default", "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert "Paris" in out["choices"][0]["message"]["content"]
    assert out["usage"]["completion_tokens"] >= 1


def test_repeated_long_prompt_reuses_radix_cache(server):
    prompt = " ".join(f"Item {i} is a line of a long inventory list." for i in range(60))
    params = {"max_new_tokens": 2, "temperature": 0}
    first = post(server.url + "/generate", {"text": prompt, "sampling_params": params})
    second = post(server.url + "/generate", {"text": prompt, "sampling_params": params})
    n = second["meta_info"]["prompt_tokens"]
    assert n > 500
    assert first["meta_info"]["cached_tokens"] < n // 2
    assert second["meta_info"]["cached_tokens"] >= n - 1  # all but the last token comes from the radix tree
