"""The hyper-scaling harness: intervals, the three axes, the maximum batch and its check, resuming,
the report's frontiers and paired comparisons, the reproduction's tasks, SGLang's own client."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.harness import axes, report, stats, sweep
from kvsqueeze.harness.stub import StubConfig, StubServer
from kvsqueeze.harness.tasks import make_questions, parse_tasks

ROOT = Path(__file__).resolve().parents[1]


# ---- intervals -------------------------------------------------------------------------------------
def test_wilson_interval_closed_form():
    # Wilson (1927) for 5/10 and 0/20 at z = 1.96, written out
    for k, n in ((5, 10), (0, 20), (19, 20), (37, 100)):
        p, z = k / n, stats.Z95
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        lo, hi = stats.wilson(k, n)
        assert lo == pytest.approx(max(0, centre - half)) and hi == pytest.approx(min(1, centre + half))
    assert stats.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # the textbook value


def test_bootstrap_interval_covers_like_the_normal_interval_on_many_questions():
    rng = random.Random(0)
    values = [rng.random() for _ in range(400)]
    m = sum(values) / len(values)
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))
    lo, hi = stats.bootstrap_mean(values)
    assert lo == pytest.approx(m - 1.96 * se, abs=0.25 * se) and hi == pytest.approx(m + 1.96 * se, abs=0.25 * se)
    assert stats.bootstrap_mean([0.5, 0.5]) == (0.5, 0.5)


def test_question_scores_and_accuracy():
    q = stats.score_question("a", ["7", "3", "7", None], "7")
    assert (q.per_sample, q.majority, q.any_right) == (0.5, 1, 1)
    q = stats.score_question("b", ["3", "3", "7"], "7")
    assert (q.per_sample, q.majority, q.any_right) == (pytest.approx(1 / 3), 0, 1)
    acc = stats.accuracy([stats.score_question(str(i), ["1"] if i < 3 else ["2"], "1") for i in range(10)])
    assert (acc.per_sample, acc.majority, acc.pass_at_w) == (0.3, 0.3, 0.3)
    assert acc.majority_ci == pytest.approx(stats.wilson(3, 10))


def test_paired_comparison_on_common_questions_only():
    a = {"q1": 1, "q2": 1, "q3": 0, "q4": 1, "only-a": 1}
    b = {"q1": 0, "q2": 1, "q3": 1, "q4": 0, "only-b": 0}
    p = stats.paired(a, b)
    assert (p.questions, p.wins, p.losses) == (4, 2, 1) and p.diff == pytest.approx(0.25)
    big = stats.paired({str(i): 1 for i in range(60)}, {str(i): int(i % 3 == 0) for i in range(60)})
    assert big.separated and big.ci[0] > 0


# ---- the axes --------------------------------------------------------------------------------------
def test_peak_per_question_closed_forms():
    rows = [{"prompt_tokens": 100, "output_tokens": 9}, {"prompt_tokens": 100, "output_tokens": 5}]
    assert axes.question_peak_tokens(rows, 30, 3, shares_prompt=True) == 100 + 8 + 4
    assert axes.question_peak_tokens(rows, 30, 3, shares_prompt=False) == 200 + 8 + 4
    held = [dict(r, kv_held_peak_server=90 * 27) for r in rows]  # 27 dense-token equivalents each
    assert axes.question_peak_tokens(held, 30, 3, shares_prompt=True) == 54
    assert axes.question_peak_tokens([{"prompt_tokens": "", "output_tokens": 3}], 30, 3, True) is None
    # a DMS server's samples that took 30 dense-token equivalents of the prompt from the radix cache:
    # the shared part once, each sample's own 10 on top
    shared = [dict(r, kv_held_peak_server=90 * 40, kv_shared_server=90 * 30) for r in rows]
    assert axes.question_peak_tokens(shared, 30, 3, shares_prompt=True) == 30 + 2 * 10
    # ... and the report's per-question peaks read the shared part too (they once summed the samples)
    import pandas as pd

    df = pd.DataFrame([dict(r, qid="q", extracted="7", answer="7", ok=1) for r in shared])
    assert report._question_outcomes(df, {"layers": 30, "kv_heads": 3}, "n")[1] == {"q": 50}
    assert axes.max_batch(1000, 333) == 3 and axes.max_batch(999, 333) == 3 and axes.max_batch(998, 333) == 2
    assert axes.max_batch(100, 333) == 0


def test_decode_bound_and_weight_count(small_model):
    from transformers import AutoModelForCausalLM

    # 4 questions x 2 samples; a step reads 1e6 weight bytes + 4 x 500 tokens x 100 bytes = 1.2e6 bytes
    assert axes.decode_bound_tok_s(1.2e9, 1e6, 100, 4, 2, 500) == pytest.approx(8 * 1000)
    model = AutoModelForCausalLM.from_pretrained(small_model)
    assert axes.weight_count(small_model) == sum(p.numel() for p in model.parameters())
    bw = axes.copy_bandwidth(mib=16, repeats=2)
    assert bw["bytes_s"] > 1e8 and bw["device"] in ("cpu", "cuda")


# ---- the maximum batch, against a stub whose budget and KV are known --------------------------------
def _spec(tmp_path, url, grid, name="run", **kw):
    base = dict(methods=sweep.parse_methods("none"), grid=sweep.parse_grid(grid), out_dir=tmp_path / name,
                url=url, tasks=["lookup"], questions_per_task=8, users=1, pilot=1, max_time=60.0,
                flush_between=False)
    base.update(kw)
    return sweep.BenchSpec(**base)


def _stub_prompt_words():
    qs = make_questions(["lookup"], 8)
    return {len(q.prompt.split()) for q in qs}


def test_the_maximum_batch_is_what_the_budget_holds_and_the_server_retracts_nothing(tmp_path):
    (P,) = _stub_prompt_words()  # every lookup prompt has the same number of words (the stub's tokens)
    W, k = 2, 4
    peak = P + W * (k - 1)  # the prompt once (shared by the two samples) and 3 stored tokens each
    budget = 3 * peak + peak // 2
    with StubServer(StubConfig(ttft=0.2, gap=0.05, tokens=k, budget=budget)) as s:
        run = sweep.run_bench(_spec(tmp_path, s.url, [f"W={W} L=8"]), log=lambda m: None)
        seen = s.peak_questions
        retracted = s.retracted
    cfg = json.loads((run / "configs.json").read_text())[0]
    mb = cfg["max_batch"]
    assert mb["pilot_peaks"] == [peak] and mb["predicted"] == 3 and mb["used"] == 3
    assert mb["retractions"] == 0 and mb["verified"] is True and cfg["status"] == "complete"
    assert seen == 3 and retracted == 0  # the batch phase ran three questions at once, no more
    row = json.loads((run / "summary.json").read_text())[0]
    assert row["max_batch"] == 3 and row["peak_kv_per_question"] == pytest.approx(peak)
    assert row["questions"] == 8 and row["decode_tok_s"] > 0 and row["pct_of_bound"] > 0
    text = (run / "report.md").read_text()
    assert "maj@W [95%]" in text and "% of bandwidth bound" in text
    for f in ("plots/hyperscaling.png", "plots/accuracy_vs_W.png", "plots/latency_percentiles.png"):
        assert (run / f).stat().st_size > 0


def test_a_batch_with_fewer_questions_left_than_fit_is_filled_for_throughput(tmp_path):
    """3 questions fit, 2 are left after the pilot: the batch phase runs 2, then a wave of 3 (answered
    questions again) measures the throughput at the maximum batch; accuracy counts each question once."""
    (P,) = _stub_prompt_words()
    W, k = 2, 4
    peak = P + W * (k - 1)
    with StubServer(StubConfig(ttft=0.2, gap=0.05, tokens=k, budget=3 * peak + peak // 2)) as s:
        run = sweep.run_bench(_spec(tmp_path, s.url, [f"W={W} L=8"], questions_per_task=3), log=lambda m: None)
        seen = s.peak_questions
    cfg = json.loads((run / "configs.json").read_text())[0]
    mb = cfg["max_batch"]
    assert mb["predicted"] == 3 and mb["used"] == 3 and mb["filled"] is True and mb["throughput_phase"] == "fill-3"
    assert [a["phase"] for a in mb["attempts"]] == ["batch", "fill-3"] and seen == 3
    samples = pd.read_csv(run / "samples.csv")
    fill = samples[samples["phase"] == "fill-3"]
    assert len(fill) == 3 * W and fill["qid"].nunique() == 3  # the repeat has a qid of its own
    row = json.loads((run / "summary.json").read_text())[0]
    assert row["questions"] == 3 and row["samples"] == 3 * W and row["max_batch"] == 3
    span = (fill["start_unix"] + fill["e2e_s"]).max() - fill["start_unix"].min()
    assert row["output_tok_s"] == pytest.approx(fill["output_tokens"].sum() / span, rel=1e-6)
    assert "3 (filled)" in (run / "report.md").read_text()


def test_server_reported_peaks_set_the_batch_and_a_retracting_server_is_caught(tmp_path):
    (P,) = _stub_prompt_words()
    W, k, ratio = 2, 4, 1.5
    peak = W * (P + k - 1) / ratio  # each sample's own prompt, compressed (what DMS reports)
    budget = int(5.3 * peak)  # slack: slots rounded to whole ones, prompts scaled to the longest
    cfg = StubConfig(ttft=0.2, gap=0.05, tokens=k, budget=budget, kv_ratio=ratio, real_budget=int(2.5 * peak))
    with StubServer(cfg) as s:
        run = sweep.run_bench(_spec(tmp_path, s.url, [f"W={W} L=8"]), log=lambda m: None)
    c = json.loads((run / "configs.json").read_text())[0]
    assert c["max_batch"]["peak_source"] == "server"
    assert c["max_batch"]["pilot_peaks"][0] == pytest.approx(peak, rel=0.02)
    # the stub really holds only 2.5 questions: the batch phase at the predicted 5 retracts, so the
    # harness verifies waves of a quarter fewer questions at once: 3 (retracts), then 2 (passes)
    mb = c["max_batch"]
    assert mb["predicted"] == 5
    assert [(a["users"], a["retractions"] > 0) for a in mb["attempts"]] == [(5, True), (3, True), (2, False)]
    assert mb["used"] == 2 and mb["verified"] is True and mb["retractions"] == 0
    assert mb["throughput_phase"] == "verify-2" and c["status"] == "complete"
    row = json.loads((run / "summary.json").read_text())[0]
    assert row["kv_reads_source"] == "server"
    # the waves' questions were answered in the batch phase: counted once for accuracy
    assert row["questions"] == 8 and row["samples"] == 8 * W and row["max_batch"] == 2
    samples = pd.read_csv(run / "samples.csv")
    wave = samples[samples["phase"] == "verify-2"]
    assert len(wave) == 2 * W and len(samples) == (8 + 3 + 2) * W
    span = (wave["start_unix"] + wave["e2e_s"]).max() - wave["start_unix"].min()
    assert row["output_tok_s"] == pytest.approx(wave["output_tokens"].sum() / span, rel=1e-6)
    assert "2 (verified after 5 retracted)" in (run / "report.md").read_text()


def test_a_server_that_retracts_at_every_smaller_batch_leaves_the_configuration_incomplete(tmp_path):
    (P,) = _stub_prompt_words()
    W, k, ratio = 2, 4, 1.5
    peak = W * (P + k - 1) / ratio
    cfg = StubConfig(ttft=0.2, gap=0.05, tokens=k, budget=int(5.3 * peak), kv_ratio=ratio,
                     real_budget=int(0.5 * peak))  # not even one question fits beside nothing
    with StubServer(cfg) as s:
        run = sweep.run_bench(_spec(tmp_path, s.url, [f"W={W} L=8"]), log=lambda m: None)
    c = json.loads((run / "configs.json").read_text())[0]
    mb = c["max_batch"]
    assert [a["users"] for a in mb["attempts"]] == [5, 3, 2, 1] and mb["verified"] is False
    assert c["status"] == "incomplete" and any("retracted" in r and "at 1 as well" in r for r in c["reasons"])
    assert "(retracted!)" in (run / "report.md").read_text()


def test_a_budget_too_small_for_one_question_fails_before_anything_starts(tmp_path):
    with StubServer(StubConfig(budget=300)) as s:  # --url: the server's own budget
        with pytest.raises(KvsqueezeError, match=r"budget=300.*W=8 L=64"):
            sweep.run_bench(_spec(tmp_path, s.url, ["W=1,8 L=64"]), log=lambda m: None)
        assert s.requests == 0
    spec = _spec(tmp_path, None, ["W=2 L=8"], budget_tokens=100)  # servers it would start
    with pytest.raises(KvsqueezeError, match=r"budget=100: expected at least 180 KV tokens"):
        sweep.run_bench(spec, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_resume_keeps_finished_configurations_and_refuses_another_grid(tmp_path):
    quick = dict(questions_per_task=3, pilot=3)  # every question in the pilot: one Locust run per configuration
    with StubServer(StubConfig(ttft=0.02, gap=0.005, tokens=3)) as s:
        run = sweep.run_bench(_spec(tmp_path, s.url, ["W=1,2 L=8"], **quick), log=lambda m: None)
        configs = json.loads((run / "configs.json").read_text())
        assert [c["status"] for c in configs] == ["complete", "complete"]
        first_dir = run / "configs" / sweep.slug(configs[0]["config"])
        kept = (first_dir / "requests.csv").read_text()
        # the run was interrupted during its second configuration
        configs[1]["status"] = "incomplete"
        (run / "configs.json").write_text(json.dumps(configs))
        second_dir = run / "configs" / sweep.slug(configs[1]["config"])
        (second_dir / "requests.csv").write_text("half a row")
        with pytest.raises(KvsqueezeError, match=r"resume=.*grid"):
            sweep.run_bench(_spec(tmp_path, s.url, ["W=1,4 L=8"], resume=True, **quick), log=lambda m: None)
        with pytest.raises(KvsqueezeError, match="or --resume it"):
            sweep.run_bench(_spec(tmp_path, s.url, ["W=1,2 L=8"], **quick), log=lambda m: None)
        logs = []
        sweep.run_bench(_spec(tmp_path, s.url, ["W=1,2 L=8"], resume=True, **quick), log=logs.append)
        assert any("1 configuration(s) finished" in m for m in logs)
        assert (first_dir / "requests.csv").read_text() == kept
        again = json.loads((run / "configs.json").read_text())
        assert [c["config"] for c in again] == [c["config"] for c in configs]
        assert all(c["status"] == "complete" for c in again)
        assert "half a row" not in (second_dir / "requests.csv").read_text()
        # --redo: a method's configurations run again although finished (its server changed)
        logs, before = [], s.requests
        sweep.run_bench(_spec(tmp_path, s.url, ["W=1,2 L=8"], resume=True, redo=["none"], **quick),
                        log=logs.append)
        served = s.requests - before
    assert any("0 configuration(s) finished" in m for m in logs)
    redone = json.loads((run / "configs.json").read_text())
    assert served == 3 + 3 and all(c["status"] == "complete" for c in redone)
    assert all(r["started_unix"] > a["started_unix"] for r, a in zip(redone, again))
    samples = pd.read_csv(run / "samples.csv")
    assert len(samples) == 3 * 1 + 3 * 2  # the new rows only, nothing twice
    resumed = json.loads((run / "run.json").read_text())["resumed"]
    assert len(resumed) == 2 and "redo" not in resumed[0] and "redo none" in resumed[1]
    with pytest.raises(KvsqueezeError, match="run directory written by kvsqueeze bench"):
        sweep._check_resume(tmp_path / "nope", _spec(tmp_path, None, ["W=1"]))


def test_redo_is_refused_without_resume_or_for_a_method_not_in_the_run(tmp_path, monkeypatch, capsys):
    from kvsqueeze import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--methods", "none", "--redo", "none", "--url", "http://127.0.0.1:9"]) != 0
    assert "redo='none': expected methods of a run continued with --resume" in capsys.readouterr().err
    assert cli.main(["bench", "--methods", "none", "--redo", "dms:8", "--resume", "x",
                     "--url", "http://127.0.0.1:9"]) != 0
    assert "redo='dms:8': expected methods of the run (none)" in capsys.readouterr().err
    assert not (tmp_path / "results").exists() and not (tmp_path / "x").exists()


# ---- the report's frontiers and pairs ---------------------------------------------------------------
def _row(method, W, L, acc, lo, hi, reads, peak, tps):
    return {"run": "r", "config": f"{method}|{W}|{L}", "method": method, "W": W, "L": L, "mode": "n",
            "endpoint": "generate", "samples": 10, "accuracy_majority": acc, "accuracy_majority_lo": lo,
            "accuracy_majority_hi": hi, "kv_reads_per_question": reads, "peak_kv_per_question": peak,
            "output_tok_s": tps}


def test_frontier_verdicts_compare_each_frontier_point_with_the_best_cheaper_vanilla_point():
    import pandas as pd

    s = pd.DataFrame([_row("none", 1, 8, 0.30, 0.22, 0.39, 500, 700, 100),
                      _row("none", 4, 8, 0.50, 0.41, 0.59, 2000, 720, 30),
                      _row("dms:8", 1, 8, 0.28, 0.20, 0.37, 150, 100, 120),
                      _row("dms:8", 2, 8, 0.36, 0.28, 0.45, 1500, 300, 110),
                      _row("dms:8", 4, 8, 0.70, 0.61, 0.78, 600, 400, 80)])
    lines = report.frontier_verdicts(s)
    reads = next(ln for ln in lines if "token reads" in ln)
    # the reads frontier of dms:8 is 1-8 (150) and 4-8 (600); 2-8 is dominated by 4-8.
    # 4-8 against the best vanilla point reading at most 600: 1-8 (500 reads, 0.30 [.., 0.39])
    assert "above by more than the intervals at 4-8 (0.70 vs 1-8's 0.30)" in reads
    assert "beyond every none point (none costs as little) at 1-8" in reads and "2-8" not in reads
    tput = next(ln for ln in lines if "tokens/s" in ln)
    # at least 120 tok/s: no vanilla point; at least 80: vanilla 1-8 (100 tok/s, 0.30)
    assert "above by more than the intervals at 4-8 (0.70 vs 1-8's 0.30)" in tput
    assert "beyond every none point (none costs as little) at 2-8, 1-8" in tput  # 110 and 120 tok/s
    peak = next(ln for ln in lines if "peak KV" in ln)
    assert "beyond every none point (none costs as little) at 1-8, 2-8, 4-8" in peak
    level = pd.DataFrame([_row("none", 1, 8, 0.30, 0.22, 0.39, 500, 700, 100),
                          _row("dms:4", 1, 8, 0.33, 0.25, 0.42, 600, 300, 90)])
    (reads,) = [ln for ln in report.frontier_verdicts(level) if "token reads" in ln]
    assert "above by more than the intervals at no point; within the intervals at 1-8 (0.33 vs 1-8's 0.30)" in reads


def test_paired_rows_take_the_same_questions_of_the_same_configuration(tmp_path):
    import pandas as pd

    summary = pd.DataFrame([_row("none", 2, 8, 0.5, 0, 1, 1, 1, 1), _row("dms:8", 2, 8, 0.5, 0, 1, 1, 1, 1)])
    o = {"none|2|8": {f"q{i}": stats.QuestionOutcome(f"q{i}", 0.5, i % 2, 1) for i in range(10)},
         "dms:8|2|8": {f"q{i}": stats.QuestionOutcome(f"q{i}", 0.5, 1, 1) for i in range(8)}}
    (row,) = report.paired_rows(summary, o)
    assert row["questions"] == 8 and row["wins"] == 4 and row["losses"] == 0
    assert row["d_majority"] == pytest.approx(0.5)


# ---- the reproduction's tasks ----------------------------------------------------------------------
def test_needle_and_facts_hide_their_answer_in_the_middle_half_and_splits_are_disjoint():
    from transformers import AutoTokenizer

    from kvsqueeze.model import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    evals = make_questions(["needle", "facts"], 6)
    for q in evals:
        body = q.prompt.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
        if q.task == "needle":
            at = body.index(f"The pass key is {q.answer}.")
        else:
            name = re.search(r"What is (\w+)'s locker", q.prompt).group(1)
            at = body.index(f"({name}'s locker number is {q.answer}.)")
            assert len(re.findall(r"locker number is \d+\.\)", body)) == 3
        assert 0.2 < at / len(body) < 0.8
        assert 450 < len(tok(q.prompt).input_ids) < 1100
    dev = make_questions(["needle", "facts"], 6, split="dev")
    assert not {q.prompt for q in dev} & {q.prompt for q in evals}
    assert [q.prompt for q in make_questions(["needle"], 3)] == [q.prompt for q in make_questions(["needle"], 3)]
    with pytest.raises(KvsqueezeError, match="split='test'"):
        make_questions(["needle"], 1, split="test")


def test_sized_tasks_take_the_context_length_they_name():
    """``needle:CHARS`` / ``facts:CHARS``: a context of that many characters of prose (tokens in
    proportion), the answer still in the middle half, the spec kept as the question's task; the
    unsized default set is the one every earlier release generated; bad sizes refused by name."""
    from transformers import AutoTokenizer

    from kvsqueeze.model import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    short = make_questions(parse_tasks("needle:1250,facts:1250"), 4)
    full = make_questions(["needle", "facts"], 4)
    assert [q.task for q in short[:2]] == ["needle:1250", "facts:1250"] and short[0].qid == "needle:1250-0"
    for q in short:
        body = q.prompt.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
        key = q.answer if q.task.startswith("needle") else re.search(r"What is (\w+)'s locker", q.prompt).group(1)
        assert 0.15 < body.index(key) / len(body) < 0.85  # the middle half of the words
    ratio = (sum(len(tok(q.prompt).input_ids) for q in short) / sum(len(tok(q.prompt).input_ids) for q in full))
    assert 0.4 < ratio < 0.6  # half the characters, about half the tokens
    assert [q.prompt for q in full] == [q.prompt for q in make_questions(parse_tasks("needle,facts"), 4)]
    for bad, why in (("needle:50", r"in \[400, 20000\]"), ("lookup:900", "only needle, facts take"),
                     ("needle:x", "whole number"), ("haystack", "one of passkey")):
        with pytest.raises(KvsqueezeError, match=why):
            parse_tasks(bad)


# ---- SGLang's own client ---------------------------------------------------------------------------
def test_sglangs_own_benchmark_client_starts_in_this_environment():
    out = subprocess.run([sys.executable, "-m", "kvsqueeze.backends.sglang.bench_serving", "--help"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--backend" in out.stdout and "--max-concurrency" in out.stdout
