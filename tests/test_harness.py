"""The load harness: per-sample metrics against a scripted stub, parsing, tasks, sweeps, reports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.harness import report, sweep
from kvsqueeze.harness.client import Client, StreamParser, build_body
from kvsqueeze.harness.stub import StubConfig, StubServer
from kvsqueeze.harness.tasks import (extract_answer, make_questions, majority, parse_tasks)

ROOT = Path(__file__).resolve().parents[1]
RECORDED = Path(__file__).with_name("data") / "harness-run"


# ---- metrics recovered from a server with known timings --------------------------------------
# The client's figures are checked against what the stub recorded on its own clock (when it got each
# request and when it wrote each chunk), not against its script: a stub that runs late on a busy
# machine moves both alike. What the client adds, the receive path, is bounded by RECEIVE_BOUND_S,
# half the scripted gap between chunks, so a chunk timed one chunk late (or early) cannot pass.
# Measured on a 2-core machine: at most 0.4 ms idle, at most 5.5 ms with both cores kept busy.
STUB_GAP_S = 0.05
RECEIVE_BOUND_S = STUB_GAP_S / 2


@pytest.fixture(scope="module")
def stub():
    with StubServer(StubConfig(ttft=0.10, gap=STUB_GAP_S, tokens=6)) as s:
        yield s


def received_lags(res, sample, record) -> list[float]:
    """Per chunk of ``sample``: when the client received it minus when the stub wrote it (seconds)."""
    received = [res.sent_perf + t for t in sample.chunk_s]
    assert len(received) == len(record.writes), (len(received), len(record.writes))
    return [r - w for r, w in zip(received, record.writes)]


@pytest.mark.timing
@pytest.mark.parametrize("endpoint", ["generate", "completions", "chat"])
@pytest.mark.parametrize("n", [1, 3])
def test_ttft_gaps_and_totals_match_what_the_stub_wrote(stub, endpoint, n):
    client = Client(stub.url)
    for k in range(2):  # the second request reuses the keep-alive connection
        prompt = f"the key is 4321 ({endpoint}, n={n}, request {k})"
        res = client.stream(endpoint, build_body(endpoint, prompt, n, 32, 0.7))
        assert res.ok, res.error
        rec = stub.record(prompt)
        assert res.sent_perf <= rec.arrival  # the clock starts before the server has the request
        assert len(res.samples) == n == rec.n
        w = rec.writes
        for s in res.samples:
            lags = received_lags(res, s, rec)
            assert min(lags) >= 0, lags  # no chunk is timed before the stub wrote it
            assert max(lags) < RECEIVE_BOUND_S, lags
            # each figure is its chunk's time from the send: TTFT the first, E2E the last
            assert w[0] - res.sent_perf <= s.ttft_s < w[0] - res.sent_perf + RECEIVE_BOUND_S
            assert w[-1] - res.sent_perf <= s.e2e_s < w[-1] - res.sent_perf + RECEIVE_BOUND_S
            assert len(s.gaps_s) == 5
            for got, wrote in zip(s.gaps_s, (b - a for a, b in zip(w, w[1:]))):
                assert abs(got - wrote) < RECEIVE_BOUND_S
            # TPOT divides by the server's token count (6, from usage), not by the chunks
            assert s.output_tokens == 6 and s.tokens_source == "usage"
            assert abs(s.tpot_s - (w[-1] - w[0]) / 5) < 2 * RECEIVE_BOUND_S / 5
            assert s.text.startswith(" 4321") and s.finish_reason == "length"
    client.close()


def test_max_tokens_caps_the_stream_and_usage_counts_tokens(stub):
    res = Client(stub.url).stream("generate", build_body("generate", "x 7", 2, 3, 0.0))
    assert [s.output_tokens for s in res.samples] == [3, 3]
    assert [len(s.chunk_s) for s in res.samples] == [3, 3]


def test_a_kept_alive_connection_the_server_closed_is_replaced_not_failed():
    """Servers close idle kept-alive connections (uvicorn after 5 s): the next request on it must go out
    on a new connection, once, and succeed."""
    with StubServer(StubConfig(ttft=0.01, gap=0.001, tokens=2, idle_close=0.2)) as s:
        client = Client(s.url)
        first = client.stream("generate", build_body("generate", "one 1", 1, 4, 0))
        time.sleep(0.5)  # the stub has closed the connection meanwhile
        second = client.stream("generate", build_body("generate", "two 2", 1, 4, 0))
        assert first.ok and second.ok, second.error
        assert [r.prompt for r in s.log] == ["one 1", "two 2"]  # each sent once
        client.close()


def test_a_refused_connection_is_a_failed_request_not_an_exception():
    port = _free_port()
    res = Client(f"http://127.0.0.1:{port}").stream("generate", build_body("generate", "x", 2, 4, 0))
    assert not res.ok and "Error" in res.error
    assert [s.ttft_s for s in res.samples] == [None, None]


def _free_port():
    from kvsqueeze.backends.sglang.server import free_port

    return free_port()


# ---- stream parsing without a server -----------------------------------------------------------
def test_generate_stream_cumulative_text_per_index():
    p = StreamParser("generate", 2)
    meta = lambda k, fin=None: {"id": "a", "completion_tokens": k, "prompt_tokens": 10,  # noqa: E731
                                "cached_tokens": 9, "finish_reason": fin}
    p.feed({"index": 1, "text": " 1", "meta_info": meta(1)}, 0.5)
    p.feed({"index": 0, "text": " 9", "meta_info": meta(1)}, 0.6)
    p.feed({"index": 1, "text": " 12", "meta_info": meta(2, {"type": "stop"})}, 0.7)
    p.feed({"index": 0, "text": " 9", "meta_info": meta(1)}, 0.8)  # no new text: not a chunk
    p.feed({"index": 0, "text": " 99", "meta_info": meta(3, {"type": "length"})}, 0.9)
    p.finish()
    a, b = p.samples
    assert (a.text, a.first_s, a.chunk_s, a.output_tokens, a.finish_reason) == \
        (" 99", 0.6, [0.6, 0.9], 3, "length")
    assert (b.text, b.first_s, b.gaps_s, b.cached_tokens) == (" 12", 0.5, [pytest.approx(0.2)], 9)


def test_openai_stream_without_per_chunk_usage_falls_back_honestly():
    one = StreamParser("completions", 1)
    one.feed({"choices": [{"index": 0, "text": "a", "finish_reason": None}]}, 0.1)
    one.feed({"choices": [{"index": 0, "text": "b", "finish_reason": "stop"}]}, 0.2)
    one.feed({"choices": [], "usage": {"completion_tokens": 5, "prompt_tokens": 3}}, 0.3)
    one.finish()
    assert (one.samples[0].output_tokens, one.samples[0].tokens_source) == (5, "usage_total")
    two = StreamParser("chat", 2)
    for i in (0, 1):
        two.feed({"choices": [{"index": i, "delta": {"content": "x"}, "finish_reason": "stop"}]}, .1)
    two.feed({"choices": [], "usage": {"completion_tokens": 7}}, 0.2)
    two.finish()
    assert [(s.output_tokens, s.tokens_source) for s in two.samples] == [(1, "chunks")] * 2


def test_error_event_and_bad_index():
    p = StreamParser("generate", 1)
    p.feed({"error": {"message": "boom"}}, 0.1)
    assert p.error == "boom"
    with pytest.raises(ValueError, match="sample 3"):
        p.feed({"index": 3, "text": "x", "meta_info": {}}, 0.1)


# ---- tasks ---------------------------------------------------------------------------------------
def test_questions_are_deterministic_and_answerable_from_the_prompt():
    qs = make_questions(parse_tasks("passkey,lookup,arithmetic"), 3, seed=5)
    assert [q.to_dict() for q in qs] == [q.to_dict() for q in make_questions(
        ["passkey", "lookup", "arithmetic"], 3, seed=5)]
    assert [q.task for q in qs[:3]] == ["passkey", "lookup", "arithmetic"]
    for q in qs:
        if q.task == "passkey":
            assert f"pass key is {q.answer}." in q.prompt
        elif q.task == "lookup":
            name = re.search(r"What is (\w+)'s", q.prompt).group(1)
            assert f"{name}: {q.answer}\n" in q.prompt
        else:
            a, b = map(int, re.findall(r"What is (\d+) \+ (\d+)\?\nA:$", q.prompt)[0])
            assert str(a + b) == q.answer


def test_answer_extraction_and_majority_vote():
    assert extract_answer(" The pass key is 12345. Remember") == "12345"
    assert extract_answer("no digits") is None
    assert majority(["3", None, "4", "4", "3"]) == "3"  # tie: first seen
    assert majority(["5", "4", "4"]) == "4"
    assert majority([None, None]) is None


# ---- closed forms --------------------------------------------------------------------------------
@pytest.mark.parametrize("P,T", [(0, 0), (10, 1), (10, 2), (7, 9), (1220, 64)])
def test_computed_kv_reads_match_the_step_by_step_sum(P, T):
    brute = sum(P + t - 1 for t in range(2, T + 1)) * 30 * 3
    assert report.kv_reads_computed(P, T, 30, 3) == brute


def test_pareto_frontier_against_brute_force():
    import random

    rng = random.Random(0)
    for _ in range(50):
        xs = [rng.randint(0, 9) for _ in range(8)]
        ys = [rng.randint(0, 9) for _ in range(8)]
        front = set(report.pareto(xs, ys))
        for i in range(8):
            beaten = any(xs[j] <= xs[i] and ys[j] >= ys[i] and (xs[j], ys[j]) != (xs[i], ys[i])
                         for j in range(8))
            assert (i in front) == (not beaten)


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,msg", [(["W=0"], "grid W='0'"), (["X=1"], "KEY one of"),
                                      (["mode=both"], "one of n, concurrent"),
                                      (["endpoint=foo"], "one of generate")])
def test_bad_grid_is_named(grid, msg):
    with pytest.raises(KvsqueezeError, match=re.escape(msg)):
        sweep.parse_grid(grid)


@pytest.mark.parametrize("methods,msg", [("fusion:1.5", "threshold=1.5"), ("fusion:0", "threshold=0.0"),
                                         ("fusion:0.9:cos", "one of block, token"),
                                         ("foo", "method='foo': expected one of"), ("kvtc:0.5", ">= 1"),
                                         ("none:2", "none without a setting"), ("none,dense", "once"),
                                         ("dms:3", "(4, 8)"), ("snapkv:4", "kvsqueeze eval` only"),
                                         ("dms:4+fusion", "cannot run in one server")])
def test_bad_methods_are_named(methods, msg):
    with pytest.raises(KvsqueezeError, match=re.escape(msg)):
        sweep.parse_methods(methods)


def test_bad_bench_arguments_fail_before_anything_starts(tmp_path):
    for argv, msg in ((["--grid", "L=x"], "grid L='x'"), (["--methods", "dms:2"], "ratio=2.0"),
                      (["--tasks", "chess"], "tasks='chess'"), (["--questions", "0"], "questions=0")):
        out = subprocess.run([sys.executable, "-m", "kvsqueeze.cli", "bench", "--out",
                              str(tmp_path / "r"), *argv], capture_output=True, text=True)
        assert out.returncode == 2 and msg in out.stderr, out.stderr
        assert not (tmp_path / "r").exists()


def test_defaults_parse():
    assert [s.label for s in sweep.parse_methods(None)] == ["none", "dms:4", "dms:8"]
    assert [s.label for s in sweep.parse_methods("none,dms:4,dms:8,kvtc:8,fusion")] == [
        "none", "dms:4", "dms:8", "kvtc:8", "fusion:0.9:token"]
    assert sweep.parse_grid(["W=1,2 L=8", "mode=n,concurrent"]) == {
        "W": [1, 2], "L": [8], "mode": ["n", "concurrent"], "endpoint": ["generate"]}


# ---- whole runs against the stub -------------------------------------------------------------------
def _bench(tmp_path, url, grid, name="run", max_time=60.0):
    spec = sweep.BenchSpec(methods=sweep.parse_methods("none"), grid=sweep.parse_grid(grid),
                           out_dir=tmp_path / name, url=url, questions_per_task=2, users=2,
                           max_time=max_time, flush_between=False, tasks=["passkey", "lookup", "arithmetic"])
    return sweep.run_bench(spec, log=lambda m: None)


def test_a_sweep_against_the_stub_writes_rows_summary_report_and_plots(tmp_path):
    with StubServer(StubConfig(ttft=0.03, gap=0.005, tokens=4)) as s:
        run = _bench(tmp_path, s.url, ["W=1,3 L=8 mode=n,concurrent"])
        firsts = [r.writes[0] - r.arrival for r in s.log]
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "complete"
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary) == 4
    qs = json.loads((run / "questions.json").read_text())
    # The stub answers with the prompt's first number: which questions that gets right is known.
    expected = sum(re.search(r"\d+", q["prompt"]).group(0) == q["answer"] for q in qs) / len(qs)
    for row in summary:
        assert row["status"] == "complete" and row["failed"] == 0
        assert row["samples"] == len(qs) * row["W"]
        assert row["accuracy"] == pytest.approx(expected)
        assert row["accuracy_majority"] == pytest.approx(expected)
        # every sample's TTFT lies between its request's first write (the stub's record) and that
        # plus what Locust's process and the receive path add on a busy machine (generously bounded)
        assert min(firsts) <= row["ttft_p50_s"] < max(firsts) + 0.25
        assert row["kv_reads_source"] == "computed"
    for f in ("report.md", "summary.csv", "samples.csv", "plots/hyperscaling.png",
              "plots/accuracy_vs_W.png", "plots/latency_percentiles.png"):
        assert (run / f).is_file() and (run / f).stat().st_size > 0, f


def test_a_server_that_dies_mid_run_leaves_an_incomplete_run_with_partial_results(tmp_path):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "kvsqueeze.harness.stub", "--port", str(port),
                             "--ttft", "0.02", "--gap", "0.002", "--tokens", "4",
                             "--die-after", "3"], env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                import urllib.request

                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        run = _bench(tmp_path, url, ["W=1 L=8 mode=n,concurrent"], max_time=30)
    finally:
        proc.kill()
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "incomplete"
    configs = json.loads((run / "configs.json").read_text())
    assert [c["status"] for c in configs] == ["incomplete", "incomplete"]  # the next one still ran
    first = configs[0]
    assert first["rows"] == 6 and 0 < first["failed_rows"] < 6
    summary = json.loads((run / "summary.json").read_text())
    assert summary[0]["samples"] == 6 and summary[0]["failed"] == first["failed_rows"]
    assert "Incomplete configurations" in (run / "report.md").read_text()


def test_a_load_generator_killed_mid_run_marks_its_configuration_incomplete(tmp_path, monkeypatch):
    """Locust's process killed while it runs: its rows so far are kept, the configuration says why, the
    next configuration runs."""
    import threading

    real_popen = subprocess.Popen
    killed = []

    def kill_after_first_row(proc, rows: Path):
        for _ in range(600):  # the pilot's two rows, then one of the batch phase
            if rows.is_file() and len(rows.read_text().splitlines()) >= 4:
                break
            time.sleep(0.05)
        proc.kill()

    def popen(cmd, *a, **kw):
        proc = real_popen(cmd, *a, **kw)
        if "locust" in cmd and cmd[cmd.index("--csv") + 1].endswith("locust-batch") and not killed:
            # the first configuration's batch phase: killed once it wrote a row
            killed.append(proc)
            rows = Path(cmd[cmd.index("--csv") + 1]).with_name("requests.csv")
            threading.Thread(target=kill_after_first_row, args=(proc, rows), daemon=True).start()
        return proc

    monkeypatch.setattr(sweep.subprocess, "Popen", popen)
    with StubServer(StubConfig(ttft=0.2, gap=0.2, tokens=8, budget=1500)) as s:  # one question at a time
        run = _bench(tmp_path, s.url, ["W=1 L=8 mode=n,concurrent"], max_time=60)
    configs = json.loads((run / "configs.json").read_text())
    first, second = configs
    assert first["status"] == "incomplete" and first["locust_rc"] == -9
    assert any("Locust) exited with code -9" in r for r in first["reasons"]), first["reasons"]
    assert 3 <= first["rows"] < 6  # what it wrote before it died is kept
    assert second["status"] == "complete" and second["rows"] == 6
    assert json.loads((run / "run.json").read_text())["status"] == "incomplete"


def test_a_full_results_disk_stops_the_run_with_a_clear_message_and_keeps_what_was_written(tmp_path,
                                                                                         monkeypatch):
    """Once the run started, configs.json is on a device that is always full (/dev/full): the bench
    stops with one clear error, run.json says incomplete with the reason, and the rows of the
    configuration that ran stay."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this platform")
    out = tmp_path / "run"
    real = sweep._write_meta

    def meta_then_full(o, m):  # the run's directory exists now: its configs.json fills the disk
        real(o, m)
        if not (o / "configs.json").is_symlink():
            (o / "configs.json").symlink_to("/dev/full")

    monkeypatch.setattr(sweep, "_write_meta", meta_then_full)
    with StubServer(StubConfig(ttft=0.01, gap=0.001, tokens=3)) as s:
        spec = sweep.BenchSpec(methods=sweep.parse_methods("none"), grid=sweep.parse_grid(["W=1 L=8"]),
                               out_dir=out, url=s.url, questions_per_task=1, users=1, max_time=60,
                               flush_between=False, tasks=["passkey", "lookup", "arithmetic"],
                               fill_max=0)  # the batch is not filled: the rows are the questions' own
        with pytest.raises(KvsqueezeError, match=r"writing the results failed \(No space left on device.*"
                                                 r"the rows written so far are kept"):
            sweep.run_bench(spec, log=lambda m: None)
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "incomplete" and "No space left" in meta["error"]
    rows = list((out / "configs").glob("*/requests.csv"))
    assert len(rows) == 1 and len(rows[0].read_text().splitlines()) == 4  # header + 3 samples


def test_plain_locust_runs_the_default_plan(tmp_path):
    with StubServer(StubConfig(ttft=0.01, gap=0.001, tokens=3)) as s:
        out = subprocess.run([sys.executable, "-m", "locust", "-f",
                              str(ROOT / "kvsqueeze/harness/locustfile.py"), "--headless", "-u",
                              "2", "-r", "2", "--host", s.url, "--run-time", "60s",
                              "--only-summary"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import csv

    rows = list(csv.DictReader(open(tmp_path / "requests.csv")))
    assert len(rows) == 12 and all(r["ok"] == "1" for r in rows)
    assert "generate TTFT" in out.stdout + out.stderr


# ---- reports from a recorded run -------------------------------------------------------------------
def test_report_rebuilt_from_a_recorded_run_matches_its_rows(tmp_path):
    import csv
    import statistics

    run = tmp_path / "recorded"
    shutil.copytree(RECORDED, run)
    report.build(run)
    summary = {r["config"]: r for r in json.loads((run / "summary.json").read_text())}
    rows = [r for p in sorted(run.glob("configs/*/requests*.csv")) for r in csv.DictReader(open(p))]
    assert rows
    dims = json.loads((run / "run.json").read_text())["dims"]
    for config, s in summary.items():
        mine = [r for r in rows if r["config"] == config and r["ok"] == "1"]
        assert s["samples"] == len([r for r in rows if r["config"] == config])
        assert s["accuracy"] == pytest.approx(statistics.mean(int(r["correct"]) for r in mine))
        assert s["ttft_p50_s"] == pytest.approx(statistics.median(float(r["ttft_s"]) for r in mine))
        per_q = {}
        for r in mine:
            per_q.setdefault(r["group"], 0)
            per_q[r["group"]] += report.kv_reads_computed(
                int(float(r["prompt_tokens"])), int(float(r["output_tokens"])),
                dims["layers"], dims["kv_heads"])
        assert s["kv_reads_per_question"] == pytest.approx(statistics.mean(per_q.values()))
    # and two runs compare into one report with a run column
    other = tmp_path / "other"
    shutil.copytree(RECORDED, other)
    meta = json.loads((other / "run.json").read_text())
    meta["run"] = "other"
    (other / "run.json").write_text(json.dumps(meta))
    path = report.build_many([run, other], tmp_path / "cmp")
    both = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert len(both) == 2 * len(summary) and {r["run"] for r in both} == {meta["run"], "recorded"}
    assert "| run |" in path.read_text()


def test_report_of_a_directory_that_is_not_a_run():
    with pytest.raises(KvsqueezeError, match="run directory"):
        report.load_run(Path("/nonexistent-run"))


def test_neardup_questions_are_the_same_document_with_small_edits():
    qs = make_questions(["neardup"], 3, seed=1)
    stripped = []
    for q in qs:
        sentence = f"The pass key is {q.answer}. Remember it."
        assert q.prompt.count(sentence) == 1
        stripped.append(q.prompt.replace(sentence + " ", "").replace(" " + sentence, "").split(" "))
    for other in stripped[1:]:
        assert len(other) == len(stripped[0])
        assert 0 < sum(a != b for a, b in zip(stripped[0], other)) <= 8
    assert len({q.answer for q in qs}) == 3


def test_locust_master_and_worker_run_the_same_locustfile(tmp_path):
    with StubServer(StubConfig(ttft=0.005, gap=0.001, tokens=2)) as s:
        lf = str(ROOT / "kvsqueeze/harness/locustfile.py")
        worker = subprocess.Popen([sys.executable, "-m", "locust", "-f", lf, "--worker"],
                                  cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            out = subprocess.run([sys.executable, "-m", "locust", "-f", lf, "--master", "--headless",
                                  "--expect-workers", "1", "-u", "2", "-r", "2", "--host", s.url,
                                  "--run-time", "8s", "--only-summary"], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=120)
        finally:
            try:
                worker.wait(30)  # the master tells its worker to quit at the end of the run
            except subprocess.TimeoutExpired:
                worker.kill()
    assert out.returncode == 0, out.stderr[-2000:]
    import csv

    rows = list(csv.DictReader(open(tmp_path / "requests-w0.csv")))
    assert len(rows) == 12 and all(r["ok"] == "1" for r in rows)
