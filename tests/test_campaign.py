"""Load campaigns: arrival processes against their distributions (on the stub's own arrival records),
rate fidelity, the schedule split between Locust workers, SLO goodput and attainment by hand, the
capacity search (pure and on a stub of known capacity), workloads against written-out references
(SGLang's own ShareGPT sampler among them), multi-turn history, bad input, a server lost mid-point."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.harness import arrivals, campaign, capacity, measure
from kvsqueeze.harness.slo import SLO, attainment, parse_slo
from kvsqueeze.harness.stub import StubConfig, StubServer
from kvsqueeze.harness.traffic import PointPlan, read_rows
from kvsqueeze.harness.workloads import Conversation, Turn, WorkloadContext, parse_workload
from kvsqueeze.harness.workloads import sharegpt

ROOT = Path(__file__).resolve().parents[1]


def _convs(n: int, tokens: int = 4, turns: int = 1) -> list[dict]:
    return [Conversation(f"c{i}", tuple(Turn(f"request {i} turn {k}", tokens) for k in range(turns))).to_dict()
            for i in range(n)]


def _plan(url, convs, load="poisson", value=10.0, offsets=(), **kw) -> PointPlan:
    return PointPlan(url=url, conversations=convs, load=load, value=value, offsets=list(offsets),
                     max_time_s=kw.pop("max_time_s", 60), point=kw.pop("point", "test"), **kw)


# ---- arrivals: pure ----------------------------------------------------------------------------------
def test_schedules_start_at_zero_are_seeded_and_have_the_stated_mean():
    for kind, b in (("constant", 1.0), ("poisson", 1.0), ("gamma", 0.25), ("gamma", 4.0)):
        shape = arrivals.LoadShape(kind, b)
        s = arrivals.schedule(shape, 5.0, 20001, seed=3)
        assert s[0] == 0 and s == arrivals.schedule(shape, 5.0, 20001, seed=3)
        gaps = [b_ - a for a, b_ in zip(s, s[1:])]
        mean = sum(gaps) / len(gaps)
        var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
        assert mean == pytest.approx(0.2, rel=0.03)
        # coefficient of variation: 0 (constant), 1 (Poisson), 1/sqrt(burstiness) (gamma)
        assert math.sqrt(var) / mean == pytest.approx(0.0 if kind == "constant" else 1 / math.sqrt(b), abs=0.05)


def test_every_request_of_a_schedule_is_owned_by_exactly_one_worker():
    for workers in (1, 2, 3, 7):
        owners = [[w for w in range(workers) if arrivals.owned(i, w, workers)] for i in range(50)]
        assert all(len(o) == 1 for o in owners)


@pytest.mark.parametrize("text,msg", [("uniform", "KIND one of"), ("poisson:0", "rate > 0"),
                                      ("poisson:-1", "rate > 0"), ("closed:1.5", "whole number"),
                                      ("poisson:1:2", "KIND:RATE"), ("gamma:1:0", "burstiness=0.0"),
                                      ("poisson:x", "a number")])
def test_bad_load_shapes_are_named(text, msg):
    with pytest.raises(KvsqueezeError, match=re.escape(msg)):
        arrivals.parse_load(text)


# ---- arrivals on the stub: goodness of fit, rate fidelity, the split between workers ---------------
def _arrival_gaps(stub) -> list[float]:
    t = sorted(r.arrival for r in stub.log)
    return [b - a for a, b in zip(t, t[1:])]


@pytest.mark.timing
@pytest.mark.parametrize("kind,burstiness", [("poisson", 1.0), ("gamma", 0.5), ("gamma", 4.0)])
def test_inter_arrival_times_at_the_server_follow_the_stated_distribution(tmp_path, kind, burstiness):
    """The stub's own arrival times (its clock) of a Locust-driven open-loop point: a Kolmogorov-Smirnov
    test against the exponential / gamma distribution of the stated rate (not fitted to the data)."""
    from scipy import stats

    rate, n = 20.0, 160
    shape = arrivals.LoadShape(kind, burstiness)
    with StubServer(StubConfig(ttft=0.01, gap=0.002, tokens=2)) as s:
        rec = campaign.run_point(_plan(s.url, _convs(n, 2), kind, rate, arrivals.schedule(shape, rate, n, seed=1)),
                                 tmp_path, log=lambda m: None, scrape_interval=None)
        gaps = _arrival_gaps(s)
    assert rec["status"] == "complete" and rec["rows"] == n and len(gaps) == n - 1
    dist = stats.gamma(burstiness, scale=1 / (rate * burstiness))  # burstiness 1: the exponential
    assert stats.kstest(gaps, dist.cdf).pvalue > 0.01
    # and the test has the power to tell: the same gaps against half the rate, or against another shape
    # of the same rate (gamma(0.5) for Poisson arrivals, the exponential for gamma ones), are rejected
    assert stats.kstest(gaps, stats.gamma(burstiness, scale=2 / (rate * burstiness)).cdf).pvalue < 0.01
    other = 0.5 if burstiness == 1.0 else 1.0
    assert stats.kstest(gaps, stats.gamma(other, scale=1 / (rate * other)).cdf).pvalue < 0.01


@pytest.mark.timing
def test_the_client_keeps_a_rate_of_60_requests_per_second(tmp_path):
    """Constant arrivals at 60 requests/s: the rate the stub saw (its own arrival records) within 3% of
    it, and the client's own lag (actual minus scheduled send) under a tenth of the interval at the
    median and under one interval at p99 (a late request never passes the next one's time)."""
    rate, n = 60.0, 240
    shape = arrivals.LoadShape("constant")
    with StubServer(StubConfig(ttft=0.02, gap=0.005, tokens=4)) as s:
        rec = campaign.run_point(_plan(s.url, _convs(n), "constant", rate, arrivals.schedule(shape, rate, n)),
                                 tmp_path, log=lambda m: None, scrape_interval=None)
        arrived = sorted(r.arrival for r in s.log)
        prompts = [r.prompt for r in s.log]
    assert rec["rows"] == n and len(prompts) == len(set(prompts)) == n
    seen = (n - 1) / (arrived[-1] - arrived[0])
    assert seen == pytest.approx(rate, rel=0.03)
    f = rec["figures"]
    assert 0 <= f["lag_p50_s"] < 0.1 / rate and f["lag_p99_s"] < 1 / rate, (f["lag_p50_s"], f["lag_p99_s"])
    assert f["offered_rps"] == pytest.approx(rate, rel=1e-6)  # the schedule's own rate
    assert f["requests_per_s"] == pytest.approx(rate, rel=0.05)


@pytest.mark.timing
def test_distributed_workers_split_the_schedule_and_send_each_request_once(tmp_path):
    rate, n = 20.0, 60
    offsets = arrivals.schedule(arrivals.LoadShape("poisson"), rate, n, seed=2)
    with StubServer(StubConfig(ttft=0.01, gap=0.002, tokens=2)) as s:
        rec = campaign.run_point(_plan(s.url, _convs(n, 2), "poisson", rate, offsets), tmp_path,
                                 log=lambda m: None, scrape_interval=None, workers=2)
        prompts = sorted(r.prompt for r in s.log)
        arrived = sorted(r.arrival for r in s.log)
    assert prompts == sorted(f"request {i} turn 0" for i in range(n))  # each once, none missing
    per_worker = read_rows(tmp_path)  # requests-w0.csv and requests-w1.csv
    workers = {r["worker"] for r in per_worker}
    assert workers == {"0", "1"} and len(per_worker) == n and rec["status"] == "complete"
    assert {r["conversation"] for r in per_worker if r["worker"] == "0"} == {f"c{i}" for i in range(0, n, 2)}
    # one schedule, not two: the span of arrivals is the schedule's, not twice the requests
    assert arrived[-1] - arrived[0] == pytest.approx(offsets[-1], abs=0.1)


# ---- SLO, goodput, attainment by hand ------------------------------------------------------------------
def test_slo_spelling_and_errors():
    slo = parse_slo("ttft=2s,tpot=150ms,e2e=20", 0.9)
    assert slo.bounds == {"ttft": 2.0, "tpot": 0.15, "e2e": 20.0} and slo.target == 0.9
    for text, msg in (("itl=1s", "a metric among ttft, tpot, e2e"), ("ttft=2h", "a unit among s, ms"),
                      ("ttft", "METRIC=VALUE"), ("ttft=0", "a bound > 0"), ("ttft=1,ttft=2", "each metric once")):
        with pytest.raises(KvsqueezeError, match=re.escape(msg)):
            parse_slo(text)
    with pytest.raises(KvsqueezeError, match="attainment=1.5"):
        parse_slo("ttft=1s", 1.5)


def test_goodput_and_attainment_on_a_hand_computed_case():
    slo = SLO({"ttft": 1.0, "tpot": 0.1}, 0.75)
    reqs = [dict(ok=1, ttft_s=0.5, tpot_s=0.05, e2e_s=2),  # meets both
            dict(ok=1, ttft_s=1.0, tpot_s=0.1, e2e_s=3),  # on the bounds: meets (<=)
            dict(ok=1, ttft_s=1.5, tpot_s=0.05, e2e_s=3),  # TTFT too slow
            dict(ok=1, ttft_s=0.2, tpot_s=None, e2e_s=0.2),  # one token: no TPOT, meets it
            dict(ok=0, ttft_s=None, tpot_s=None, e2e_s=None)]  # failed: meets nothing
    a = attainment(slo, reqs, duration_s=2.0)
    assert (a.sent, a.met, a.failed) == (5, 3, 1)
    assert a.attainment == pytest.approx(0.6) and a.goodput == pytest.approx(1.5) and not a.meets_target
    assert a.met_by_metric == {"ttft": 3, "tpot": 4}
    lo, hi = a.interval  # Wilson 95% for 3 of 5, written out
    z = 1.959963984540054
    c = (0.6 + z * z / 10) / (1 + z * z / 5)
    h = z * math.sqrt(0.6 * 0.4 / 5 + z * z / 100) / (1 + z * z / 5)
    assert (lo, hi) == (pytest.approx(c - h), pytest.approx(c + h))


def test_point_figures_against_a_written_out_case():
    rows = [dict(phase="warmup", ok=1, sent_s=0.0, scheduled_s=0.0, e2e_s=9, ttft_s=9, tpot_s=1, itl_s="[9]",
                 output_tokens=5, lag_s=0.0, turn=0),
            dict(phase="measured", ok=1, sent_s=1.0, scheduled_s=1.0, e2e_s=2.0, ttft_s=0.5, tpot_s=0.5,
                 itl_s="[0.5, 0.5, 0.5]", output_tokens=4, lag_s=0.001, turn=0, cached_tokens=10, cached_device=10),
            dict(phase="measured", ok=1, sent_s=2.0, scheduled_s=2.0, e2e_s=3.0, ttft_s=1.0, tpot_s=1.0,
                 itl_s="[1.0, 1.0]", output_tokens=3, lag_s=0.003, turn=1, cached_tokens=30, cached_device=20,
                 cached_storage=10),
            dict(phase="measured", ok=0, sent_s=3.0, scheduled_s=3.0, e2e_s=None, ttft_s=None, tpot_s=None,
                 itl_s="[]", output_tokens=None, lag_s=0.002, turn=0)]
    f = measure.point_figures(rows, SLO({"ttft": 0.8}, 0.5))
    assert (f["requests"], f["completed"], f["failed"], f["warmup_requests"]) == (3, 2, 1, 1)
    assert f["duration_s"] == pytest.approx(4.0)  # first measured send (1.0) to last end (2.0 + 3.0)
    assert f["requests_per_s"] == pytest.approx(0.5) and f["output_tok_s"] == pytest.approx(7 / 4)
    assert f["offered_rps"] == pytest.approx(2 / 2)  # 3 measured sends over 2 s
    assert f["ttft_s_p50"] == pytest.approx(0.75) and f["itl_s_p50"] == pytest.approx(0.5)
    assert f["itl_s_mean"] == pytest.approx((3 * 0.5 + 2 * 1.0) / 5)  # every gap pooled
    assert f["cached_tokens_per_request"] == pytest.approx(20) and f["cached_storage_per_request"] == pytest.approx(5)
    assert f["returning_requests"] == 1 and f["ttft_returning_s_p50"] == pytest.approx(1.0)
    assert (f["slo_met"], f["attainment"], f["goodput_rps"]) == (1, pytest.approx(1 / 3), pytest.approx(0.25))


def test_kv_held_integral_is_the_trapezoid_of_the_scrapes():
    series = [(100.0, {"sglang:num_used_tokens": 0}), (101.0, {"sglang:num_used_tokens": 10}),
              (103.0, {"sglang:num_used_tokens": 10, "kvsqueeze_dms_held_tokens": 7, "kvsqueeze_dms_cached_tokens": 3})]
    f = measure.kv_figures(series, bytes_per_token=2.0, requests=5)
    # 0->10 over 1 s (area 5 tokens*s), then 10 -> 4 over 2 s (14): where DMS's gauges are, its held
    # tokens less the slots only its prefix cache keeps (7 - 3) are what the running requests hold
    assert f["kv_byte_s_per_request"] == pytest.approx((5 + 14) * 2 / 5)
    assert f["kv_held_peak_bytes"] == 20 and f["kv_held_mean_bytes"] == pytest.approx(19 * 2 / 3)


# ---- the capacity search -----------------------------------------------------------------------------
def test_capacity_search_brackets_a_known_threshold():
    for threshold in (0.3, 1.0, 7.3, 55.0):
        ran = []

        def passes(v, t=threshold):
            ran.append(v)
            return v <= t

        res = capacity.search(passes, start=1.0, tolerance=0.05, max_points=30)
        assert res.capacity <= threshold < res.lowest_failing
        assert (res.lowest_failing - res.capacity) / res.capacity <= 0.05
        assert len(ran) == len(set(ran))  # no point measured twice
    res = capacity.search(lambda v: v <= 6, start=1, integer=True)
    assert (res.capacity, res.lowest_failing) == (6, 7)
    res = capacity.search(lambda v: False, start=1, integer=True)
    assert res.capacity is None and "floor" in res.stopped
    # noise: a pass above a failure does not count
    assert capacity.bracket([(1, True), (2, False), (3, True), (1.5, True)]) == (1.5, 2)


@pytest.mark.timing
def test_the_capacity_search_finds_a_stub_servers_known_capacity(tmp_path):
    """The stub serves 4 requests at a time for 0.1 s each: 40 requests/s at most. Evenly spaced
    arrivals below that never wait; above it the queue grows. The SLO bounds TTFT near the stub's own
    (0.05 s): the search must land within its tolerance of 40."""
    cfg = StubConfig(ttft=0.05, gap=0.01, tokens=6, slots=4)
    assert cfg.capacity_rps == pytest.approx(40.0)
    slo = SLO({"ttft": 0.1}, 0.9)
    with StubServer(cfg) as s:
        spec = campaign.CampaignSpec(methods=campaign_methods("none"), workloads=[parse_workload("questions")],
                                     shape=arrivals.LoadShape("constant"), out_dir=tmp_path / "c", slo=slo,
                                     search=True, search_start=12.0, tolerance=0.1, duration_s=2.0, warmup="0",
                                     url=s.url, flush_between=False, scrape_interval=None)
        out = campaign.Campaign(spec, log=lambda m: None).run()
    search = json.loads((out / "campaign.json").read_text())["searches"]
    (res,) = search.values()
    assert 36.0 <= res["capacity"] <= 42.0 and res["lowest_failing"] <= 46.0, res
    cap = list(json.loads((out / "summary.json").read_text())["capacity"])
    assert cap[0]["capacity"] == res["capacity"]
    assert (out / "plots" / "latency_vs_load.png").stat().st_size > 0


def campaign_methods(text):
    from kvsqueeze.harness.sweep import parse_methods

    return parse_methods(text)


# ---- workloads -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from kvsqueeze.model import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(None))


def _sharegpt_file(path: Path, records: list, cut: bool = False) -> Path:
    text = json.dumps(records, indent=2)
    if cut:  # cut off inside the last record, as the packaged file is
        text = text[:text.rindex('"value"') + 12]
    path.write_text(text)
    return path


def _records(n=40, seed=0):
    rng = random.Random(seed)
    words = "the a cat sat on mat of code data tree runs fast slow new old".split()

    def txt(k):
        return " ".join(rng.choice(words) for _ in range(k))

    recs = []
    for i in range(n):
        turns = rng.choice([1, 2, 3, 4])
        msgs = [{"from": "human" if j % 2 == 0 else "gpt", "value": txt(rng.choice([1, 5, 30, 200]))}
                for j in range(2 * turns - (i % 5 == 0))]
        recs.append({"id": f"r{i}", "conversations": msgs})
    return recs


def test_a_file_cut_mid_record_keeps_its_complete_records(tmp_path):
    recs = _records(10)
    p = _sharegpt_file(tmp_path / "cut.json", recs, cut=True)
    with pytest.raises(json.JSONDecodeError):
        json.loads(p.read_text())
    assert list(sharegpt.load_records(str(p))) == recs[:9]


def test_sharegpt_single_turn_picks_what_sglangs_own_sampler_picks(tmp_path, tokenizer):
    """SGLang's ``sample_sharegpt_requests`` (its benchmark client's filter) on the same file and seed
    is the reference: the same prompts, prompt lengths and output lengths, in the same order."""
    from kvsqueeze import compat

    compat.apply_pre_import()
    from sglang.benchmark.datasets.sharegpt import sample_sharegpt_requests

    recs = _records(60, seed=4)
    p = _sharegpt_file(tmp_path / "sg.json", recs)
    for seed, context in ((0, 300), (5, None)):
        random.seed(seed)  # SGLang's client seeds the global generator before it samples
        ref = sample_sharegpt_requests(str(p), 12, tokenizer, context_len=context)
        ctx = WorkloadContext(tokenizer, context or 10 ** 6, seed)
        ours = parse_workload(f"sharegpt:path={p}").conversations(12, ctx)
        assert [(c.turns[0].user, c.turns[0].prompt_tokens, c.turns[0].max_tokens) for c in ours] == \
            [(r.prompt, r.prompt_len, r.output_len) for r in ref]
    # a written-out filter too: the two-token floor and the context bound hold
    ctx = WorkloadContext(tokenizer, 120, 1)
    for c in parse_workload(f"sharegpt:path={p},max_output=8").conversations(5, ctx):
        t = c.turns[0]
        full = len(tokenizer.encode(t.reply))
        assert t.prompt_tokens >= 2 and full >= 2 and t.prompt_tokens + full <= 120 and t.max_tokens == min(full, 8)
    with pytest.raises(KvsqueezeError, match=r"requests=500: expected at most \d+: workload sharegpt holds"):
        parse_workload(f"sharegpt:path={p}").conversations(500, ctx)


def test_the_packaged_sharegpt_file_is_read_to_its_complete_conversations():
    recs = sharegpt.load_records()
    assert len(recs) == 17671
    assert sum(len(sharegpt.messages_of(r)) >= 2 for r in recs) == 17400
    assert sum(len(sharegpt.messages_of(r)) >= 4 for r in recs) == 12975


def test_multiturn_turns_normalise_roles_and_respect_the_context(tokenizer):
    rec = {"conversations": [{"from": "gpt", "value": "orphan reply"}, {"from": "human", "value": "hi"},
                             {"from": "human", "value": "are you there"}, {"from": "chatgpt", "value": "yes"},
                             {"from": "user", "value": "tell me more"}, {"from": "bard", "value": "more " * 50},
                             {"from": "human", "value": "bye"}]}
    system, turns = sharegpt.turns_of(rec)
    assert system is None and turns == [("hi\n\nare you there", "yes"), ("tell me more", "more " * 50)]
    assert sharegpt.turns_of({"conversations": [{"from": "system", "value": "be brief"}] + rec["conversations"]})[0] \
        == "be brief"


def test_multiturn_conversations_fit_the_context_and_are_seeded(tokenizer):
    w = parse_workload("sharegpt-multiturn:max_turns=4,max_output=64")
    a = w.conversations(20, WorkloadContext(tokenizer, 1024, 3))
    assert [c.cid for c in a] == [c.cid for c in w.conversations(20, WorkloadContext(tokenizer, 1024, 3))]
    for c in a:
        assert 2 <= len(c.turns) <= 4 and c.chat
        hist = sum(len(tokenizer.encode(t.user)) + t.max_tokens + 16 for t in c.turns)
        assert hist <= 1024 and all(1 <= t.max_tokens <= 64 for t in c.turns)


def test_random_and_shared_prefix_workloads(tokenizer):
    ctx = WorkloadContext(tokenizer, 2048, 0)
    convs = parse_workload("random:input=100..140,output=20+-5").conversations(30, ctx)
    assert all(90 <= c.turns[0].prompt_tokens <= 150 for c in convs)
    assert len({c.turns[0].user[:40] for c in convs}) == 30  # no shared beginnings
    sp = parse_workload("shared-prefix:per_group=3,prefix=200,question=20,output=8").conversations(7, ctx)
    assert [c.group for c in sp] == ["g0", "g1", "g2", "g0", "g1", "g2", "g0"]  # round robin over 3 groups
    g0 = [c.turns[0].user for c in sp if c.group == "g0"]
    cut = g0[0].index("\n\nQuestion:")
    assert all(u[:cut] == g0[0][:cut] for u in g0) and len(set(g0)) == 3  # one prefix, own questions
    nd = parse_workload("shared-prefix:kind=edits,per_group=4,prefix=128,output=8").conversations(4, ctx)
    a, b = (tokenizer.encode(c.turns[0].user) for c in nd[:2])
    assert a != b and sum(x != y for x, y in zip(a, b)) <= 8  # near-duplicates: a few edits apart


def test_jsonl_lines_are_checked_with_their_line_numbers(tmp_path, tokenizer):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hello", "max_tokens": 5, "answer": 42}\n\n# a comment\n'
                    '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, '
                    '{"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]}\n')
    convs = parse_workload(f"jsonl:path={good}").conversations(2, WorkloadContext(tokenizer))
    assert convs[0].turns[0] == Turn("hello", 5, None, "42")
    assert convs[1].chat and convs[1].turns[0].user == "u2" and len(convs[1].history) == 3
    from kvsqueeze.harness.workloads import messages_for

    assert [m["role"] for m in messages_for(convs[1], 0, [])] == ["system", "user", "assistant", "user"]
    for line, msg in (('{"prompt": "x"', "bad.jsonl:2: line="), ('{"prompt": "x", "max_tokens": 0}', "max_tokens=0"),
                      ('{"prompt": "x", "foo": 1}', "key='foo'"), ('{"messages": [{"role": "bot", "content": "x"}]}',
                                                                     "role one of system"),
                      ('{"prompt": "x", "messages": []}', "exactly one of prompt or messages"),
                      ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}',
                       "a last message from the user")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "fine"}\n' + line + "\n")
        with pytest.raises(KvsqueezeError, match=re.escape(msg)) as e:
            parse_workload(f"jsonl:path={bad}").conversations(1, WorkloadContext(tokenizer))
        assert "bad.jsonl:2" in str(e.value)
    with pytest.raises(KvsqueezeError, match=r"requests=3: expected at most 2"):
        parse_workload(f"jsonl:path={good}").conversations(3, WorkloadContext(tokenizer))


@pytest.mark.parametrize("text,msg", [("chess", "NAME one of"), ("sharegpt:foo=1", "KEY one of output"),
                                      ("random:input=9..3", "LOW <= HIGH"), ("random:output=x", "MEAN+-STD"),
                                      ("sharegpt-multiturn:think=-1", "think time >= 0"),
                                      ("sharegpt:max_output=-2", "max_output=-2"), ("shared-prefix:per_group=1",
                                                                                    "at least 2 requests"),
                                      ("questions:tasks=chess", "tasks='chess'")])
def test_bad_workloads_are_named(text, msg):
    with pytest.raises(KvsqueezeError, match=re.escape(msg)):
        parse_workload(text)


# ---- multi-turn replay on the stub ---------------------------------------------------------------------
@pytest.mark.parametrize("endpoint,replies", [("generate", "server"), ("chat", "server"), ("generate", "recorded")])
def test_a_later_turn_carries_the_earlier_turns_and_their_replies(tmp_path, tokenizer, endpoint, replies):
    from kvsqueeze.model import resolve_model

    recs = [{"id": f"m{i}", "conversations": [
        {"from": "human", "value": f"first question {i} about {i * 11}"}, {"from": "gpt", "value": f"recorded {i}"},
        {"from": "human", "value": f"second question {i}"}, {"from": "gpt", "value": f"recorded again {i}"},
        {"from": "human", "value": f"third question {i}"}, {"from": "gpt", "value": "that is fine then"}]} for i in range(3)]
    p = _sharegpt_file(tmp_path / "mt.json", recs)
    convs = parse_workload(f"sharegpt-multiturn:path={p},replies={replies},think=0.05").conversations(
        3, WorkloadContext(tokenizer, 4096, 0))
    with StubServer(StubConfig(ttft=0.01, gap=0.002, tokens=3)) as s:
        plan = _plan(s.url, [c.to_dict() for c in convs], "poisson", 5.0, [0.0, 0.1, 0.2], endpoint=endpoint,
                     replies=replies, think_s=0.05, tokenizer=str(resolve_model(None)))
        rec = campaign.run_point(plan, tmp_path / "pt", log=lambda m: None, scrape_interval=None)
        log = list(s.log)
    rows = read_rows(tmp_path / "pt")
    assert rec["status"] == "complete" and len(rows) == 9 and all(r["ok"] == "1" for r in rows)
    for c in convs:
        mine = [r for r in log if c.turns[0].user in r.prompt]
        assert len(mine) == 3  # every turn repeats the first user message
        replies_seen = {int(r["turn"]): r["text"] for r in rows if r["conversation"] == c.cid}
        for k in (1, 2):
            prompt = next(r.prompt for r in mine if c.turns[k].user in r.prompt)
            for j in range(k):
                assert c.turns[j].user in prompt
                held = c.turns[j].reply if replies == "recorded" else replies_seen[j].strip()
                assert held in prompt, (held, prompt)
            if endpoint == "generate":  # the model's chat template, as the server would apply it
                assert "<|im_start|>user" in prompt and prompt.rstrip().endswith("assistant")


# ---- a whole campaign: bad input before anything starts, a server lost mid-point ------------------------
def test_bad_campaign_arguments_fail_before_anything_starts(tmp_path, capsys):
    from kvsqueeze.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with StubServer(StubConfig()) as s:
        for argv, msg in ((["--load", "zipf"], "load='zipf'"), (["--rates", "0"], "rates=0.0"),
                          (["--rates", "1", "--duration", "-5"], "duration=-5.0"),
                          (["--rates", "1", "--slo", "p50=1s"], "slo='p50'"),
                          (["--rates", "1", "--slo", "ttft=1fortnight"], "slo ttft='1fortnight'"),
                          (["--search"], "search='on'"), (["--concurrency", "2"], "concurrency='2'"),
                          (["--rates", "1", "--workload", f"jsonl:path={bad}"], "bad.jsonl:2: prompt=3"),
                          (["--rates", "1", "--workload", "sharegpt", "--requests", "20000"], "requests=20000"),
                          (["--load", "gamma", "--burstiness", "0", "--rates", "1"], "burstiness=0.0"),
                          (["--rates", "1", "--redo", "none"], "redo='none': expected methods of a campaign continued")):
            rc = main(["campaign", "--url", s.url, "--methods", "none", "--out", str(tmp_path / "c"), *argv])
            err = capsys.readouterr().err
            assert rc == 2 and msg in err, (argv, err[-500:])
            assert not (tmp_path / "c").exists()
        assert s.requests == 0


def test_a_server_lost_mid_point_leaves_the_point_incomplete_and_the_campaign_goes_on(tmp_path):
    from kvsqueeze.backends.sglang.server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvsqueeze.harness.stub", "--port", str(port), "--ttft", "0.01",
                             "--gap", "0.002", "--tokens", "3", "--die-after", "12"],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        spec = campaign.CampaignSpec(methods=campaign_methods("none"), workloads=[parse_workload("questions")],
                                     shape=arrivals.LoadShape("poisson"), out_dir=tmp_path / "c", values=[10.0, 20.0],
                                     slo=SLO({"ttft": 1.0}), duration_s=2.0, warmup="0", url=url,
                                     flush_between=False, scrape_interval=None)
        out = campaign.Campaign(spec, log=lambda m: None).run()
    finally:
        proc.kill()
    points = json.loads((out / "points.json").read_text())
    assert [p["status"] for p in points] == ["incomplete", "incomplete"]  # both ran; the second found it gone
    first = points[0]
    assert any("lost their connection" in r for r in first["reasons"]), first["reasons"]
    rows = read_rows(out / "points" / campaign.slug(first["point"]))
    answered = sum(r["ok"] == "1" for r in rows)  # the first 12, less any still streaming when it died
    assert 0 < answered <= 12 and len(rows) == first["rows"] > answered  # its rows are kept
    assert json.loads((out / "campaign.json").read_text())["status"] == "incomplete"
    assert "Incomplete points" in (out / "report.md").read_text()


# ---- the soak ------------------------------------------------------------------------------------------
def _soak_rows(ttfts: list[float], gap: float = 1.0) -> list[dict]:
    return [dict(phase="measured", ok=1, sent_s=i * gap, scheduled_s=i * gap, ttft_s=t, tpot_s=0.1, e2e_s=t + 1,
                 itl_s="[0.1]", output_tokens=2, lag_s=0.0, turn=0) for i, t in enumerate(ttfts)]


def test_the_soak_flags_latency_drift_and_memory_growth_and_only_them():
    from kvsqueeze.harness.soak import analyse

    rng = random.Random(0)
    flat = [1.0 + rng.random() * 0.2 for _ in range(300)]
    rising = [1.0 + i / 300 + rng.random() * 0.2 for i in range(300)]  # doubles over the soak
    t0 = 1000.0
    steady_mem = [(t0 + k * 10, 500e6 + rng.random() * 1e6) for k in range(30)]
    leaking = [(t0 + k * 10, 500e6 + k * 5e6) for k in range(30)]  # +30% over the soak
    a = analyse(_soak_rows(flat), steady_mem, [], 300, 10, None, 1.0, 0.0, t0)
    assert not a["ttft_s_drift"]["flagged"] and not a["memory"]["flagged"] and not a["idle_kv_flagged"]
    assert a["ttft_s_drift"]["lo"] < 1 < a["ttft_s_drift"]["hi"]
    b = analyse(_soak_rows(rising), leaking, [], 300, 10, None, 1.0, 12.0, t0)
    assert b["ttft_s_drift"]["flagged"] and b["ttft_s_drift"]["ratio"] == pytest.approx(
        (1 + 250 / 300 + 0.1) / (1 + 50 / 300 + 0.1), rel=0.05)  # medians of the last and first thirds
    assert b["memory"]["flagged"] and b["memory"]["slope_mib_per_hour"] == pytest.approx(5e6 / 2**20 * 360, rel=1e-6)
    assert b["idle_kv_flagged"] and [w["requests"] for w in b["windows"]] == [30] * 10


@pytest.mark.timing
def test_a_short_soak_on_the_stub_writes_its_report(tmp_path):
    from kvsqueeze.harness.soak import SoakSpec, run_soak

    with StubServer(StubConfig(ttft=0.02, gap=0.005, tokens=3)) as s:
        spec = SoakSpec(method=campaign_methods("none")[0], workload=parse_workload("random:input=32,output=3"),
                        out_dir=tmp_path / "soak", rate=10.0, minutes=0.1, windows=3, url=s.url,
                        server_pid=os.getpid(), memory_every=1.0, slo=SLO({"ttft": 1.0}))
        out = run_soak(spec, log=lambda m: None)
        sent = len(s.log)
    r = json.loads((out / "soak.json").read_text())
    assert r["overall"]["requests"] == sent == r["overall"]["completed"] and sent > 35
    assert sum(w["requests"] for w in r["windows"]) == sent and r["memory"]["samples"] >= 5
    assert r["idle_kv_tokens"] == 0.0  # the stub reports 0 used tokens once idle
    assert "Verdict" in (out / "report.md").read_text() and (out / "plots" / "soak.png").stat().st_size > 0
    with pytest.raises(KvsqueezeError, match="either --rate or --capacity-from"):
        SoakSpec(method=spec.method, workload=spec.workload, out_dir=tmp_path / "x")


def test_campaign_reports_rebuild_and_compare(tmp_path, capsys):
    """A finished campaign's report rebuilds from its folder alone, and two compare in one report."""
    from kvsqueeze.cli import main

    folders = []
    with StubServer(StubConfig(ttft=0.01, gap=0.002, tokens=2)) as s:
        for name in ("a", "b"):
            spec = campaign.CampaignSpec(methods=campaign_methods("none"), workloads=[parse_workload("questions")],
                                         shape=arrivals.LoadShape("constant"), out_dir=tmp_path / name,
                                         values=[5.0, 10.0], slo=SLO({"ttft": 1.0}), duration_s=1.0, warmup="0",
                                         url=s.url, flush_between=False, scrape_interval=None)
            folders.append(campaign.Campaign(spec, log=lambda m: None).run())
    before = (folders[0] / "summary.csv").read_text()
    (folders[0] / "report.md").unlink()
    assert main(["report", str(folders[0])]) == 0
    assert (folders[0] / "report.md").is_file() and (folders[0] / "summary.csv").read_text() == before
    assert main(["report", str(folders[0]), str(folders[1]), "--out", str(tmp_path / "cmp")]) == 0
    cap = json.loads((tmp_path / "cmp" / "summary.json").read_text())["capacity"]
    assert sorted(c["method"] for c in cap) == ["none@a", "none@b"] and all(c["capacity"] == 10 for c in cap)
    assert "1 (baseline)" in (tmp_path / "cmp" / "report.md").read_text()
    capsys.readouterr()
    assert main(["report", str(folders[0]), str(folders[1])]) == 2  # several need --out
    assert "--out DIR" in capsys.readouterr().err
