"""The KVTC storage tier inside a real SGLang CPU server: pages stored compressed, restored on a hit."""

import json
import urllib.request

import pytest

from kvsqueeze.backends.sglang.server import SGLangServer, free_port
from kvsqueeze.backends.sglang.serving import kvtc_store_args
from kvsqueeze.model import resolve_model

pytestmark = pytest.mark.slow


def _post(url, payload=None, timeout=300):
    req = urllib.request.Request(url, data=json.dumps(payload or {}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


@pytest.fixture(scope="module")
def kvtc_server(tmp_path_factory, embedded):
    from kvsqueeze import corpus
    from kvsqueeze.methods.kvtc import calibrate as kvtc

    d = tmp_path_factory.mktemp("kvtc-sglang")
    _, tok, model = embedded
    cal = kvtc.calibrate(model, tok, corpus.calibration_documents(max_chars=300_000), seq_len=512,
                         segments=4, tune=False, sample_tokens=1024)
    cal_path = cal.save(d / "cal.safetensors")
    stats = d / "stats.json"
    srv = SGLangServer(model=resolve_model(None), port=free_port(), log_path=d / "server.log",
                       extra_args=kvtc_store_args(str(cal_path), 4.0, stats_file=str(stats))
                       + ["--enable-metrics"]).start_and_wait(timeout=400)
    yield srv, stats, d / "server.log"
    srv.stop()


def test_flushed_prefix_is_restored_from_kvtc_storage_with_the_same_output(kvtc_server):
    from pydoc_data import topics

    srv, stats, log = kvtc_server
    text = "\n".join(list(topics.topics.values())[10:14])[:3000]
    body = {"text": text, "sampling_params": {"max_new_tokens": 12, "temperature": 0}}
    first = json.loads(_post(srv.url + "/generate", body))
    _post(srv.url + "/flush_cache?timeout=300", timeout=400)  # waits for the write to storage
    second = json.loads(_post(srv.url + "/generate", body))
    details = second["meta_info"].get("cached_tokens_details") or {}
    assert details.get("storage_backend") == "KVTCHiCacheStorage", (second["meta_info"], log.read_text()[-3000:])
    assert details.get("storage", 0) >= 64 * (first["meta_info"]["prompt_tokens"] // 64 - 1)
    assert details.get("device", 0) == 0
    # at 4x the KVTC cache is close to lossless (KL ~1e-3 on held-out text): greedy output unchanged
    assert second["text"] == first["text"]
    s = json.loads(stats.read_text())
    assert s["pages_stored"] >= 8 and s["hits"] >= 8 and s["corrupt"] == 0
    assert s["ratio"] >= 3.5  # 4x on the coded tokens; page 0 keeps its 4 sink tokens exact
    with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
        metrics = r.read().decode()
    assert "kvsqueeze_kvtc_hits" in metrics and "kvsqueeze_kvtc_bytes_after" in metrics


def test_kvtc_tier_and_fusion_compose_in_one_server(kvtc_server, embedded, tmp_path):
    """``kvtc:4+fusion:0.9:token``: near-duplicate prompts fuse into shared pages (fusion's meta_info),
    the pages go to the KVTC tier on a flush and come back from it (the storage part of cached_tokens),
    a prompt restored from storage gives the first pass's output, both parts' figures are on /metrics,
    and SGLang's strict idle check (every page accounted for) holds throughout. (A prompt whose first
    pages are on the device again is not prefetched from storage: SGLang's prefetch threshold.)"""
    from kvsqueeze.backends.sglang.serving import ServeContext, parse_server, plan_server
    from kvsqueeze.workload import near_duplicate_workload

    _, stats_first, _ = kvtc_server
    cal_path = str(stats_first.parent / "cal.safetensors")  # the fixture's calibration
    _, tok, _ = embedded
    stats = tmp_path / "stats.json"
    ctx = ServeContext(model=resolve_model(None), calibration=cal_path, stats_file=str(stats))
    plan = plan_server(parse_server("kvtc:4+fusion:0.9:token"), ctx)
    assert plan.args[plan.args.index("--page-size") + 1] == "64" and "KVSQUEEZE_FUSION" in plan.env
    log = tmp_path / "server.log"
    srv = SGLangServer(model=resolve_model(None), port=free_port(), log_path=log, extra_args=plan.args,
                       env={**plan.env, "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"})
    srv.start_and_wait(timeout=400)
    try:
        reqs = near_duplicate_workload(tok, "edits", groups=1, per_group=3, prefix_tokens=448)
        prompts = [list(r.prompt_ids)[: len(r.prompt_ids) // 64 * 64] for r in reqs]
        body = lambda ids: {"input_ids": ids, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}  # noqa: E731
        first = [json.loads(_post(srv.url + "/generate", body(p))) for p in prompts]
        fused = [o["meta_info"]["kvsqueeze_fusion"][0]["fused_pages"] for o in first]
        assert sum(fused[1:]) >= 1, (fused, log.read_text()[-3000:])  # later near-duplicates share pages
        _post(srv.url + "/flush_cache?timeout=300", timeout=400)
        again = [json.loads(_post(srv.url + "/generate", body(p))) for p in prompts]
        restored = [(a, b) for a, b in zip(first, again)
                    if (b["meta_info"].get("cached_tokens_details") or {}).get("device", 0) == 0]
        assert len(restored) >= 2, [b["meta_info"].get("cached_tokens_details") for b in again]
        for a, b in restored:
            assert b["meta_info"]["cached_tokens_details"]["storage"] >= 64 * 5
            assert b["output_ids"] == a["output_ids"]
        with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
            metrics = r.read().decode()
        assert "kvsqueeze_fusion_pages_fused" in metrics and "kvsqueeze_kvtc_hits" in metrics
        s = json.loads(stats.read_text())
        assert s["pages_stored"] >= 3 and s["hits"] >= 3 and s["corrupt"] == 0
        assert srv.proc.poll() is None, log.read_text()[-3000:]  # the strict idle check never fired
    finally:
        srv.stop()
