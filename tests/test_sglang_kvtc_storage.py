"""The KVTC storage tier inside a real SGLang CPU server: pages stored compressed, restored on a hit."""

import json
import urllib.request

import pytest

from kvsqueeze.backends.sglang.server import SGLangServer, free_port, kvtc_store_args
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
    from kvsqueeze.methods import kvtc

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
