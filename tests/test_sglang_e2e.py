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
    srv = SGLangServer(model=resolve_model(None), port=free_port(), log_path=log,
                       extra_args=["--enable-metrics"]).start_and_wait(timeout=400)
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


def test_a_bad_prompt_gets_a_400_and_the_server_answers_the_next_request(server):
    """An empty prompt used to end the scheduler, and with it the server (the CPU rotary embedding
    cannot reshape 0 elements); it and its kin are now refused before they reach the model."""
    from conftest import refuses_bad_prompts_and_answers_the_next

    refuses_bad_prompts_and_answers_the_next(server.url)
    assert server.proc.poll() is None


def test_every_bad_input_of_the_fault_campaign_is_answered_or_refused(server):
    """``kvsqueeze check-server``'s whole bad-input catalogue against the real server: nothing fails,
    the server stays up, no KV is held once idle; the fan-out limit refuses n=100000."""
    from kvsqueeze.harness import faults

    results = faults.Campaign(server.url, log=lambda m: None).run(["input"])
    assert results and all(r.ok for r in results), faults.table(results)
    by_case = {r.case: r for r in results}
    for case in ("empty text", "empty input_ids", "token id outside the vocabulary", "empty chat",
                 "absurd n", "invalid JSON", "body not UTF-8"):
        assert by_case[case].refused == by_case[case].tried, (case, by_case[case])
    assert server.proc.poll() is None


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


def test_bench_against_the_server_matches_plain_greedy_requests(server, tmp_path):
    """The harness's streamed, per-sample view agrees with SGLang's own non-streamed answers."""
    import csv

    from kvsqueeze.harness import sweep

    spec = sweep.BenchSpec(methods=sweep.parse_methods("none"), out_dir=tmp_path / "run",
                           grid=sweep.parse_grid(["W=2 L=6 mode=n,concurrent "
                                                  "endpoint=generate,completions"]),
                           url=server.url, tasks=["lookup", "arithmetic"], questions_per_task=1,
                           users=1, temperature=0.0, max_time=120)
    run = sweep.run_bench(spec, log=lambda m: None)
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary) == 4 and all(r["status"] == "complete" for r in summary), summary
    questions = {q["qid"]: q for q in json.loads((run / "questions.json").read_text())}
    greedy = {qid: post(server.url + "/generate", {"text": q["prompt"], "sampling_params": {
        "max_new_tokens": 6, "temperature": 0}}) for qid, q in questions.items()}
    rows = list(csv.DictReader(open(run / "samples.csv")))
    assert len(rows) == 4 * 2 * len(questions)
    for r in rows:
        ref = greedy[r["qid"]]
        assert r["ok"] == "1" and r["text"] == ref["text"], (r["config"], r["text"], ref["text"])
        assert int(r["output_tokens"]) == ref["meta_info"]["completion_tokens"]
        assert r["tokens_source"] == "usage"
        assert int(float(r["prompt_tokens"])) == ref["meta_info"]["prompt_tokens"]
        assert 0 < float(r["ttft_s"]) <= float(r["e2e_s"])
    for s in summary:
        assert s["peak_kv_tokens"] > 0 and s["kv_reads_per_question"] > 0
        assert s["accuracy"] == s["accuracy_majority"]  # greedy: both samples say the same
