"""DMS inside a real SGLang server (CPU, embedded model, shipped gates): the gates run in SGLang's model,
the ``dms`` attention backend obeys their decisions, and greedy outputs match the reference DMS
inference (``DMSMethod.greedy``: the Hugging Face model on the reference cache that really drops
tokens per head)."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kvsqueeze import corpus
from kvsqueeze.backends.sglang.server import SGLangServer, free_port, post_json
from kvsqueeze.methods.dms.checkpoint import load_gates, shipped_gates_dir
from kvsqueeze.methods.dms.config import GATES_FILE
from kvsqueeze.methods.dms.method import DMSMethod
from kvsqueeze.model import resolve_model

pytestmark = pytest.mark.slow
NEW = 16
# what `kvsqueeze serve --method dms` adds (kvsqueeze.backends.sglang.serving): radix cache and chunked
# prefill stay on
DMS_ARGS = ["--attention-backend", "dms", "--radix-cache-backend", "kvsqueeze-dms", "--mem-fraction-static",
            "0.8", "--disable-overlap-schedule"]
CHUNK = ["--chunked-prefill-size", "128"]  # a 400-token prompt in four chunks


def post(url, payload, timeout=300):
    return post_json(url, payload, timeout)


def serve_outputs(tmp_path_factory, name, prompts, env=None, dms=False, repeat=0):
    """Greedy outputs of a server for ``prompts`` (vanilla: radix cache off); DMS: radix cache on and
    128-token prefill chunks, and with ``repeat`` the first ``repeat`` prompts sent a second time, a
    radix hit (those outputs and cached-token counts returned too)."""
    log = tmp_path_factory.mktemp(name) / "server.log"
    args = DMS_ARGS + CHUNK if dms else ["--disable-radix-cache"]
    srv = SGLangServer(model=resolve_model(None), port=free_port(), log_path=log, env=env or {},
                       extra_args=args).start_and_wait(timeout=400)
    try:
        out, again, cached = [], [], []
        for i, p in enumerate(prompts):
            for rnd in range(2 if i < repeat else 1):
                r = post(srv.url + "/generate", {"input_ids": p, "sampling_params": {
                    "max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}})
                (again if rnd else out).append(r["text"])
                if rnd:
                    cached.append(r["meta_info"]["cached_tokens"])
        return (out, again, cached) if repeat else out
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def prompts(embedded):
    _, tok, _ = embedded
    segs = corpus.token_segments(corpus.heldout_documents(), tok, 400, 12, what="held-out text")
    return [list(w) for _, w in segs]  # 400 tokens: far past the 64-token window


@pytest.fixture(scope="module")
def vanilla(tmp_path_factory, prompts):
    return serve_outputs(tmp_path_factory, "vanilla", prompts)


_REF: dict[int, tuple[list[str], list[list[int]], list[list[float]]]] = {}


def reference(embedded, prompts, ratio):
    """Greedy continuations, tokens and top-2 logit margins of the reference DMS inference."""
    if ratio not in _REF:
        _, tok, model = embedded
        method = DMSMethod(checkpoint=str(shipped_gates_dir(ratio)))
        texts, toks, margins = [], [], []
        for p in prompts:
            m: list[float] = []
            t, _ = method.greedy(model, torch.tensor(p), NEW, margins=m)
            texts.append(tok.decode(t))
            toks.append(t)
            margins.append(m)
        method.unbind(model)
        _REF[ratio] = (texts, toks, margins)
    return _REF[ratio]


def divergence_margin(tok, ref_toks, margins, got_text) -> tuple[int, float]:
    """The first step whose reference token the server's text does not continue, and the reference's
    top-2 logit margin there."""
    for i in range(len(ref_toks)):
        if not got_text.startswith(tok.decode(ref_toks[: i + 1])):
            return i, margins[i]
    return len(ref_toks), float("inf")


@pytest.mark.parametrize("ratio", [8])  # the shipped gates that evict the most
def test_sglang_dms_matches_the_reference_dms_inference(tmp_path_factory, embedded, prompts, vanilla,
                                                        ratio):
    _, tok, _ = embedded
    ref, ref_toks, margins = reference(embedded, prompts, ratio)
    got, again, cached = serve_outputs(tmp_path_factory, f"dms{ratio}", prompts,
                                       {"KVSQUEEZE_DMS": str(shipped_gates_dir(ratio))}, dms=True, repeat=4)
    # the second time a prompt comes, the radix cache holds all of it but the token SGLang computes
    assert cached == [len(p) - 1 for p in prompts[:4]], cached
    assert again == got[:4]  # a radix hit continues from the shared per-head state: the same outputs
    same = sum(a == b for a, b in zip(got, ref))
    differ = sum(a != b for a, b in zip(got, vanilla))
    gaps = [divergence_margin(tok, t, m, g) for g, r, t, m in zip(got, ref, ref_toks, margins) if g != r]
    print(f"DMS {ratio}x in SGLang (radix cache on, 128-token prefill chunks): {same}/{len(got)} greedy "
          f"outputs identical to the reference DMS inference, the first 4 the same again from a radix hit "
          f"(divergences at step, top-2 logit margin: {gaps}), {differ}/{len(got)} differ "
          "from vanilla SGLang")
    assert same >= 0.9 * len(prompts), list(zip(got, ref))  # >= 90% token-identical
    # the rest diverge only where the reference itself was at a near-tie
    assert all(m < 0.5 for _, m in gaps), gaps
    # eviction is really applied: the dense model's continuations differ
    assert differ >= len(prompts) // 2, list(zip(got, vanilla))


def strict_dms_server(tmp_path_factory, name: str, budget: int, chunk: str):
    """A DMS server (shipped 8x gates, metrics on) of ``budget`` KV tokens whose idle memory check is
    strict (SGLang's: available + evictable == total), and its log."""
    log = tmp_path_factory.mktemp(name) / "server.log"
    env = {"KVSQUEEZE_DMS": str(shipped_gates_dir(8)), "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
    srv = SGLangServer(model=resolve_model(None), port=free_port(), log_path=log, env=env,
                       extra_args=["--enable-metrics", "--max-total-tokens", str(budget),
                                   "--chunked-prefill-size", chunk] + DMS_ARGS).start_and_wait(timeout=400)
    return srv, log


def test_dms_server_frees_memory_admits_more_and_returns_every_page(tmp_path_factory, embedded, prompts):
    """A burst at a budget a dense pool fills with two of these requests (radix cache on, prefill
    unchunked): DMS runs more at once, outputs equal the reference inference, and a prompt longer
    than the room the burst's cache left (dense) still runs. Then the threads of one prompt share it: four requests of
    a cached prompt, one aborted mid-generation while the others finish equal to the reference; an
    ``n=4`` request holds its prompt once. Every finished or aborted request gives its slots back
    (SGLang's strict idle check, the pool's gauges: free + cache-only = all), and a prompt longer
    than the budget is refused with a clear error."""
    from kvsqueeze.harness import axes
    from kvsqueeze.harness.scrape import MetricsScraper, parse_prometheus

    _, tok, _ = embedded
    budget, burst = 1024, prompts[:8]
    ref = reference(embedded, prompts, 8)[0][:8]
    srv, log = strict_dms_server(tmp_path_factory, "dms-load", budget, "-1")
    greedy = {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}
    try:
        scraper = MetricsScraper(srv.url, interval=0.1).start()
        with ThreadPoolExecutor(len(burst)) as ex:
            outs = list(ex.map(lambda p: post(srv.url + "/generate", {"input_ids": p, "sampling_params": greedy}),
                               burst))
        peak = scraper.stop()["peak sglang:num_running_reqs"]
        # a prompt of 800 tokens: denser than the room the cache of the burst left free (the cache
        # is evicted for what its kept tokens lack, if anything: the test below)
        long = post(srv.url + "/generate", {"input_ids": prompts[10] + prompts[11], "sampling_params": {
            "max_new_tokens": 4, "temperature": 0}})
        with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
            evicted = parse_prometheus(r.read().decode()).get("sglang:evicted_tokens_total", 0)
        # four threads of prompt 0 after it is cached (as SGLang caches a prompt before the threads of
        # an n>1 request), one aborted mid-generation
        post(srv.url + "/generate", {"input_ids": burst[0], "sampling_params": {"max_new_tokens": 1}})
        with ThreadPoolExecutor(4) as ex:
            threads = [ex.submit(post, srv.url + "/generate", {"input_ids": burst[0], "sampling_params": greedy})
                       for _ in range(3)]
            pending = ex.submit(post, srv.url + "/generate", {"input_ids": burst[0], "rid": "kvsq-abort",
                                "sampling_params": {"max_new_tokens": 600, "ignore_eos": True}})
            time.sleep(4.0)
            urllib.request.urlopen(urllib.request.Request(  # answers with an empty body
                srv.url + "/abort_request", data=json.dumps({"rid": "kvsq-abort"}).encode(),
                headers={"Content-Type": "application/json"}), timeout=60).read()
            aborted = pending.result(timeout=300)
            siblings = [t.result(timeout=300) for t in threads]
        lone = post(srv.url + "/generate", {"input_ids": prompts[9], "sampling_params": greedy})
        n4 = post(srv.url + "/generate", {"input_ids": prompts[9], "sampling_params": {
            "n": 4, "max_new_tokens": NEW, "temperature": 0.8, "ignore_eos": True}})
        try:  # SGLang refuses it (HTTP 400, or an abort with the reason)
            r = post(srv.url + "/generate", {"input_ids": prompts[0] * 3, "sampling_params": {"max_new_tokens": 4}})
            message = json.dumps(r["meta_info"]["finish_reason"])
        except urllib.error.HTTPError as e:
            message = e.read().decode()
        from conftest import refuses_bad_prompts_and_answers_the_next

        refuses_bad_prompts_and_answers_the_next(srv.url)  # the head pool's n=0 prefill used to end it
        # the harness against this server: KV reads and peaks are the server's own per-request figures
        from kvsqueeze.harness import sweep

        bench = sweep.run_bench(sweep.BenchSpec(
            methods=sweep.parse_methods("dms:8"), grid=sweep.parse_grid(["W=2 L=6"]), url=srv.url,
            out_dir=tmp_path_factory.mktemp("dms-bench") / "run", tasks=["lookup"], questions_per_task=3,
            users=1, pilot=1, temperature=0.0, max_time=120, flush_between=False), log=lambda m: None)
        bench_q = json.loads((bench / "questions.json").read_text())
        solo = post(srv.url + "/generate", {"text": bench_q[0]["prompt"], "sampling_params": {
            "max_new_tokens": 6, "temperature": 0}})["meta_info"]["kvsqueeze_dms"][0]
        time.sleep(3)  # idle: SGLang checks available + evictable == total (strict), the gauges settle
        with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
            m = parse_prometheus(r.read().decode())
        running = log.read_text()
        assert srv.proc.poll() is None, running[-4000:]
    finally:
        srv.stop()
    assert "leak detected" not in running.lower() and "Traceback" not in running, running[-4000:]
    meta = [o["meta_info"]["kvsqueeze_dms"][0] for o in outs]
    got = [o["text"] for o in outs]
    dense_fit = budget // (len(burst[0]) + NEW)  # requests a dense pool of this budget holds at once
    peak = max(peak, m["kvsqueeze_dms_peak_sequences"])  # the pool's own count misses no step
    lh = 30 * 3
    shared = [x["meta_info"]["kvsqueeze_dms"][0] for x in n4]
    q_peak = axes.question_peak_tokens([{"kv_held_peak_server": x["kv_tokens_held_peak"], "kv_shared_server":
                                         x["kv_tokens_prefix_shared"]} for x in shared], 30, 3, True)
    lone_peak = lone["meta_info"]["kvsqueeze_dms"][0]["peak_held_tokens"]
    print(f"DMS 8x at a {budget}-token budget: peak running {peak} (a dense pool holds {dense_fit}), "
          f"ratios {[x['ratio'] for x in meta]}, {sum(a == b for a, b in zip(got, ref))}/8 outputs = reference, "
          f"{evicted} radix-cache tokens evicted; n=4 holds {q_peak:.0f} dense-token equivalents at peak "
          f"(one request alone {lone_peak:.0f}; its prompt {len(prompts[9])} tokens)")
    assert peak > dense_fit  # more requests at once than a dense pool of this budget could hold
    assert sum(a == b for a, b in zip(got, ref)) >= 7
    for x in meta:
        assert x["dense_tokens"] == len(burst[0]) + NEW - 1  # the last token is sampled, never stored
        assert x["ratio"] > 2 and x["held_tokens"] < x["dense_tokens"] / 2
        assert x["reads_per_step"] < x["dense_reads_per_step"] / 2
    assert long["meta_info"]["completion_tokens"] == 4
    # the threads of a cached prompt: a radix hit each, the survivors equal the reference
    assert all(t["meta_info"]["cached_tokens"] == len(burst[0]) - 1 for t in siblings)
    assert [t["text"] for t in siblings] == [ref[0]] * 3
    assert aborted["meta_info"]["finish_reason"]["type"] == "abort"
    # n=4 shares its prompt: all four hit it, and the question holds far less than four lone requests
    assert all(x["meta_info"]["cached_tokens"] == len(prompts[9]) - 1 for x in n4)
    assert all(x["kv_tokens_prefix_shared"] > 0 for x in shared)
    assert q_peak < 0.5 * 4 * lone_peak
    (row,) = json.loads((bench / "summary.json").read_text())
    (cfg,) = json.loads((bench / "configs.json").read_text())
    assert row["status"] == "complete" and row["kv_reads_source"] == "server"
    assert cfg["max_batch"]["budget_tokens"] == budget and cfg["max_batch"]["peak_source"] == "server"
    # greedy: both samples of the pilot question are the lone request's twins, sharing its prompt, so
    # the question holds the shared prefix once and each sample's own part
    assert cfg["max_batch"]["pilot_peaks"][0] == pytest.approx(
        (2 * solo["kv_tokens_held_peak"] - solo["kv_tokens_prefix_shared"]) / lh, rel=0.02)
    assert "exceeds the maximum allowed length" in message, message
    # idle: what is not free is held by the radix cache alone (freed when its entries are evicted)
    assert m["kvsqueeze_dms_free_slots"] + round(m["kvsqueeze_dms_cached_tokens"] * lh) == budget * lh
    assert m["kvsqueeze_dms_dense_tokens"] == 0


def test_gates_that_never_evict_give_the_vanilla_outputs(tmp_path_factory, embedded, prompts, vanilla):
    from safetensors.torch import save_file

    _, _, model = embedded
    d = tmp_path_factory.mktemp("zero-gates")
    src = shipped_gates_dir(4)
    shutil.copy(src / "dms_config.json", d / "dms_config.json")
    gates = load_gates(src, model)
    save_file({k: torch.zeros_like(v) if k.endswith("dms_proj_alpha.weight") else v.contiguous()
               for k, v in gates.state_dict().items()}, str(d / GATES_FILE))  # logit = -5: keep all
    # a third of the prompts: a gate that never evicts either changes nothing or shows on any prompt
    half = len(prompts) // 3
    got = serve_outputs(tmp_path_factory, "dms0", prompts[:half], {"KVSQUEEZE_DMS": str(d)}, dms=True)
    assert got == vanilla[:half]


def released_qwen3(d, separate: bool, n_prompts: int):
    """A tiny random Qwen3 in the released Model-Optimizer DMS layout (q/k norms; projection gates, or
    the repurposed query neuron) written to ``d``, ``n_prompts`` random 60-token prompts, and their
    greedy outputs under the reference DMS inference."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from kvsqueeze.attention import ATTN_IMPL, register

    torch.manual_seed(11)
    cfg = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=False)
    Qwen3ForCausalLM(cfg).save_pretrained(d)
    conf = json.loads((d / "config.json").read_text())
    conf.update(dms_alpha_scale=100.0, dms_initial_alpha_offset=5.0, dms_window_size=8, dms_cr=4,
                dms_paged_attention_block_size=8, dms_separate_alpha=separate, dms_alpha_per="head")
    (d / "config.json").write_text(json.dumps(conf))
    w = load_file(str(d / "model.safetensors"))
    w["lm_head.weight"] = w["lm_head.weight"] * 60  # peaked next-token distributions: no near-ties
    if separate:
        for i in range(2):
            w[f"model.layers.{i}.self_attn.dms_proj_alpha.weight"] = torch.randn(2, 64) * 0.05
            w[f"model.layers.{i}.self_attn.dms_proj_alpha_norm.weight"] = torch.ones(64)
    save_file({k: v.contiguous() for k, v in w.items()}, str(d / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (60,), generator=g).tolist() for _ in range(n_prompts)]
    register()
    hf = Qwen3ForCausalLM.from_pretrained(d, attn_implementation=ATTN_IMPL).eval()
    method = DMSMethod(checkpoint=str(d))
    ref = [method.greedy(hf, torch.tensor(p), NEW)[0] for p in prompts]
    method.unbind(hf)
    return prompts, ref


QWEN3_ARGS = ["--chunked-prefill-size", "16", "--skip-tokenizer-init", "--max-total-tokens", "2048"]


@pytest.mark.parametrize("separate", [True, False], ids=["projection", "query_neuron"])
def test_released_qwen3_checkpoint_served_by_sglang_equals_the_reference(tmp_path_factory, separate):
    """A tiny random Qwen3 in the released Model-Optimizer DMS layout (q/k norms; projection gates, or
    the repurposed query neuron, zeroed before and after RoPE), served by SGLang with its radix cache
    and prefill chunks: greedy outputs equal the reference DMS inference, while the gates evict."""
    d = tmp_path_factory.mktemp("qwen3-dms")
    prompts, ref = released_qwen3(d, separate, 3)
    log = d / "server.log"
    srv = SGLangServer(model=d, port=free_port(), log_path=log, env={"KVSQUEEZE_DMS": str(d)},
                       extra_args=DMS_ARGS + QWEN3_ARGS).start_and_wait(timeout=400)
    try:
        outs = [post(srv.url + "/generate", {"input_ids": p, "sampling_params": {
            "max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}}) for p in prompts]
    finally:
        srv.stop()
    got = [o["output_ids"] for o in outs]
    ratios = [o["meta_info"]["kvsqueeze_dms"][0]["ratio"] for o in outs]
    print(f"released Qwen3 layout, {'projection' if separate else 'query-neuron'} gates, in SGLang: "
          f"{sum(a == b for a, b in zip(got, ref))}/{len(got)} greedy outputs = reference, ratios {ratios}")
    assert got == ref
    assert all(r > 1.3 for r in ratios)  # the gates do evict


@pytest.mark.parametrize("separate", [True, False], ids=["projection", "query_neuron"])
def test_decode_graphs_captured_by_sglang_replay_the_reference(tmp_path_factory, separate):
    """SGLang's decode graph runner with DMS (on a CPU: ``--enable-torch-compile``, the decode forward
    compiled per captured batch size, replayed on static slot tables): batches of 1 (a captured size),
    3 (padded to 4: a padding row holds nothing and writes to the scratch slot) and 6 (above the
    largest captured size: eager) give greedy outputs equal to the reference DMS inference while the
    gates evict, and SGLang's strict idle check finds every slot back."""
    import re

    d = tmp_path_factory.mktemp("qwen3-dms-graphs")
    prompts, ref = released_qwen3(d, separate, 10)
    log = d / "server.log"
    env = {"KVSQUEEZE_DMS": str(d), "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
    srv = SGLangServer(model=d, port=free_port(), log_path=log, env=env, extra_args=DMS_ARGS + QWEN3_ARGS + [
        "--enable-torch-compile", "--cuda-graph-bs-decode", "1", "4", "--decode-log-interval", "1"]
                       ).start_and_wait(timeout=600)
    greedy = {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}

    def run(batch):
        with ThreadPoolExecutor(len(batch)) as ex:
            return list(ex.map(lambda p: post(srv.url + "/generate", {"input_ids": p, "sampling_params": greedy}),
                               batch))

    try:
        outs = run(prompts[:1]) + run(prompts[1:4]) + run(prompts[4:10])
        time.sleep(3)  # idle: SGLang checks available + evictable == total (strict); a leak kills it
        alive = post(srv.url + "/generate", {"input_ids": prompts[0], "sampling_params": greedy})
    finally:
        srv.stop()
    text = log.read_text()
    steps = re.findall(r"Decode batch, #running-req: (\d+),.*cpu graph: (True|False)", text)
    by_graph = {g: sorted({int(n) for n, gg in steps if gg == g}) for g in ("True", "False")}
    got = [o["output_ids"] for o in outs]
    ratios = [o["meta_info"]["kvsqueeze_dms"][0]["ratio"] for o in outs]
    print(f"decode graphs, {'projection' if separate else 'query-neuron'} gates: batch sizes replayed {by_graph['True']}, eager {by_graph['False']}; "
          f"{sum(a == b for a, b in zip(got, ref))}/{len(got)} greedy outputs = reference, ratios {ratios}")
    assert "Capture cpu graph bs [1, 4]" in text
    assert {1, 3} <= set(by_graph["True"])  # a captured size, and a padded one
    assert all(n > 4 for n in by_graph["False"])  # eager only above the captured sizes
    assert got == ref
    assert alive["output_ids"] == ref[0]
    assert all(r > 1.3 for r in ratios)  # the gates do evict


def test_an_extend_evicts_only_the_slots_its_kept_tokens_lack(tmp_path_factory, embedded, prompts):
    """Cached prompts whose requests have not come yet (as SGLang caches the prompt of an ``n>1``
    request before its samples) survive a new prompt whose dense length exceeds the free room but
    whose kept tokens fit: SGLang's own allocator evicts the cache for the extend's dense length
    before the forward, the DMS allocator only for the slots a layer lacks while it places them.
    Under real pressure the cache is still evicted, outputs equal the reference inference, and
    SGLang's strict idle check finds every slot back."""
    from kvsqueeze.harness.scrape import parse_prometheus

    budget, cached, lh = 650, prompts[:4], 30 * 3
    ref = reference(embedded, prompts, 8)[0]
    srv, log = strict_dms_server(tmp_path_factory, "dms-extend-room", budget, "4096")
    greedy = {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}

    def metrics():
        with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
            return parse_prometheus(r.read().decode())

    try:
        for p in cached:
            post(srv.url + "/generate", {"input_ids": p, "sampling_params": {"max_new_tokens": 1}})
        time.sleep(1.5)  # the gauges are set as outputs stream
        before = metrics()
        fresh = post(srv.url + "/generate", {"input_ids": prompts[4], "sampling_params": greedy})
        after = metrics()
        again = [post(srv.url + "/generate", {"input_ids": p, "sampling_params": {"max_new_tokens": 1}})
                 for p in cached]
        pressure = [post(srv.url + "/generate", {"input_ids": p, "sampling_params": greedy})
                    for p in prompts[5:11]]
        time.sleep(3)  # idle: SGLang checks available + evictable == total (strict)
        end = metrics()
        running = log.read_text()
        assert srv.proc.poll() is None, running[-4000:]
    finally:
        srv.stop()
    assert "leak detected" not in running.lower() and "Traceback" not in running, running[-4000:]
    free = before["kvsqueeze_dms_free_slots"] / lh
    fresh_peak = fresh["meta_info"]["kvsqueeze_dms"][0]["peak_held_tokens"]
    evicted = after.get("sglang:evicted_tokens_total", 0) - before.get("sglang:evicted_tokens_total", 0)
    print(f"{len(cached)} cached prompts leave {free:.0f} of {budget} dense-token equivalents free; a "
          f"{len(prompts[4])}-token prompt holds {fresh_peak:.0f} at its peak and evicted {evicted:.0f} cached "
          f"tokens; the cached prompts hit {[a['meta_info']['cached_tokens'] for a in again]}; under pressure "
          f"{end.get('sglang:evicted_tokens_total', 0):.0f} evicted")
    # the premise: SGLang's own eviction would have to free room for the whole dense prompt
    assert free < len(prompts[4]) and fresh_peak < free
    assert evicted == 0
    assert all(a["meta_info"]["cached_tokens"] == len(p) - 1 for a, p in zip(again, cached))
    assert fresh["text"] == ref[4]
    assert end.get("sglang:evicted_tokens_total", 0) > 0  # the six more prompts did not all fit
    assert sum(o["text"] == r for o, r in zip(pressure, ref[5:11])) >= 5
    assert end["kvsqueeze_dms_free_slots"] + round(end["kvsqueeze_dms_cached_tokens"] * lh) == budget * lh
