"""Block fusion inside a real SGLang server (CPU, embedded model): shared pages, their accounting, and
the decisions checked against the engine-agnostic reference computed on the Hugging Face model."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kvsqueeze.backends.sglang import fusion as sg_fusion
from kvsqueeze.backends.sglang.server import SGLangServer, free_port, post_json
from kvsqueeze.harness.scrape import parse_prometheus
from kvsqueeze.methods.fusion.config import FusionConfig, default_layers
from kvsqueeze.methods.fusion.online import OnlinePageFusion
from kvsqueeze.model import resolve_model
from kvsqueeze.workload import near_duplicate_workload

pytestmark = pytest.mark.slow
PAGE = 16
NEW = 8  # new tokens: prompts are whole pages, so the output stays in a partial page


def post(url, payload=None, timeout=300):
    return post_json(url, payload or {}, timeout)


def metrics(url) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        return parse_prometheus(r.read().decode())


def start(tmp_path_factory, name, env=None):
    log = tmp_path_factory.mktemp(name) / "server.log"
    env = dict(env or {}, SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE="1")  # a leak stops the scheduler
    srv = SGLangServer(model=resolve_model(None), port=free_port(), log_path=log, env=env,
                       extra_args=["--enable-metrics", "--page-size", str(PAGE)])
    return srv.start_and_wait(timeout=400), log


@pytest.fixture(scope="module")
def prompts(embedded):
    _, tok, _ = embedded
    reqs = near_duplicate_workload(tok, "edits", groups=1, per_group=4) + \
        near_duplicate_workload(tok, "chat", groups=1, per_group=3)
    out = []
    for r in reqs:
        ids = list(r.prompt_ids)
        out.append(ids[: len(ids) // PAGE * PAGE])
    return out


def generate(srv, ids):
    return post(srv.url + "/generate", {"input_ids": ids,
                                        "sampling_params": {"max_new_tokens": NEW, "temperature": 0}})


@pytest.fixture(scope="module")
def vanilla_outputs(tmp_path_factory, prompts):
    srv, _ = start(tmp_path_factory, "vanilla")
    try:
        return [generate(srv, p) for p in prompts]
    finally:
        srv.stop()


def test_fusion_with_nothing_at_the_threshold_changes_nothing(tmp_path_factory, prompts, vanilla_outputs):
    srv, log = start(tmp_path_factory, "fusion-1.0", sg_fusion.config_env(FusionConfig(threshold=1.0, similarity="block")))
    try:
        outs = [generate(srv, p) for p in prompts]
        m = metrics(srv.url)
    finally:
        srv.stop()
    assert [o["text"] for o in outs] == [o["text"] for o in vanilla_outputs]
    assert all(o["meta_info"]["kvsqueeze_fusion"][0]["fused_pages"] == 0 for o in outs)
    assert m["kvsqueeze_fusion_pages_fused"] == 0 and m["kvsqueeze_fusion_pages_checked"] > 0


def reference_decisions(embedded, prompts, cached, threshold):
    """The same online decisions made on the Hugging Face model's own keys (pages of each prompt past
    its radix prefix, in arrival order)."""
    _, _, model = embedded
    layers = default_layers(model.config.num_hidden_layers)
    keys, pages, store = [], [], []
    fus = OnlinePageFusion(10_000, threshold, "block")
    out = []
    for ids, c in zip(prompts, cached):
        with torch.no_grad():
            pkv = model(torch.tensor([ids]), use_cache=True).past_key_values
        k = torch.stack([pkv.layers[l].keys[0] if hasattr(pkv, "layers") else pkv[l][0][0]
                         for l in layers])  # [layers, heads, T, dim]
        n_pages = len(ids) // PAGE
        base = len(store)
        for p in range(n_pages):
            blk = k[:, :, p * PAGE:(p + 1) * PAGE, :].permute(0, 2, 1, 3).reshape(len(layers), PAGE, -1)
            store.append(blk)
        own = list(range(c // PAGE, n_pages))
        remap = fus.fuse([base + p for p in own], own, lambda ps: torch.stack([store[i] for i in ps]))
        out.append(len(remap))
    return out


def test_fusion_shares_pages_frees_them_and_matches_the_reference(tmp_path_factory, embedded, prompts,
                                                                   vanilla_outputs):
    threshold = 0.9
    srv, log = start(tmp_path_factory, "fusion-0.9", sg_fusion.config_env(FusionConfig(threshold=threshold, similarity="block")))
    try:
        outs = [generate(srv, p) for p in prompts]
        time.sleep(3)  # idle: SGLang checks available + evictable + protected == total (strict)
        m = metrics(srv.url)
        # an aborted near-duplicate: its fused pages are released through the same counts
        with ThreadPoolExecutor(1) as ex:
            ids = list(prompts[1])
            ids[40] = ids[41]  # a fresh near-duplicate: its pages past token 40 are its own and fuse
            body = {"input_ids": ids, "rid": "kvsq-abort",
                    "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}}
            pending = ex.submit(post, srv.url + "/generate", body)
            time.sleep(2.0)
            urllib.request.urlopen(urllib.request.Request(
                srv.url + "/abort_request", data=json.dumps({"rid": "kvsq-abort"}).encode(),
                headers={"Content-Type": "application/json"}), timeout=60).read()
            aborted = pending.result(timeout=300)
        assert aborted["meta_info"]["finish_reason"]["type"] == "abort"
        assert aborted["meta_info"]["completion_tokens"] < 400
        time.sleep(3)
        urllib.request.urlopen(urllib.request.Request(srv.url + "/flush_cache", data=b"", method="POST"),
                               timeout=300).read()
        with ThreadPoolExecutor(len(prompts)) as ex:  # the same traffic again, all in one batch
            again = list(ex.map(lambda p: generate(srv, p), prompts))
        time.sleep(3)
        running = log.read_text()  # what the server logged before it was stopped
        assert srv.proc.poll() is None, running[-4000:]
    finally:
        srv.stop()
    assert "leak detected" not in running.lower() and "Traceback" not in running, running[-4000:]
    meta = [o["meta_info"]["kvsqueeze_fusion"][0] for o in outs]
    fused = [x["fused_pages"] for x in meta]
    # own pages = prompt pages past the radix prefix
    assert [x["pages"] for x in meta] == [len(p) // PAGE - o["meta_info"]["cached_tokens"] // PAGE
                                           for p, o in zip(prompts, outs)]
    assert sum(fused) >= len(prompts)  # near-duplicates do fuse
    assert m["kvsqueeze_fusion_pages_fused"] == sum(fused)
    assert m["kvsqueeze_fusion_pages_saved"] == sum(fused)  # nothing evicted yet: every fused page still saved
    assert 1 <= m["kvsqueeze_fusion_groups"] <= m["kvsqueeze_fusion_pages_saved"]
    ref = reference_decisions(embedded, prompts, [o["meta_info"]["cached_tokens"] for o in outs], threshold)
    assert fused == ref
    # quality at 0.9 on near-duplicates: the greedy continuations barely move
    same = sum(a["text"] == b["text"] for a, b in zip(outs, vanilla_outputs))
    assert same >= len(prompts) - 2, [(a["text"], b["text"]) for a, b in zip(outs, vanilla_outputs)]
    assert all(o["meta_info"]["completion_tokens"] == NEW for o in again)
