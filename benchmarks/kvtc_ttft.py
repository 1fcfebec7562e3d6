"""Time to first token on the SGLang CPU server: a prompt restored from KVTC storage vs recomputed.

One server (embedded model, `kvsqueeze serve --method kvtc:RATIO` settings). For each trial a fresh
held-out prompt of --prompt-tokens tokens is sent with max_new_tokens=1 (so latency = TTFT): first
cold (nothing cached: full prefill), then the device and host caches are flushed (which also waits
for the pages to reach the KVTC store) and the same prompt is sent again, now restored from storage.
Both are measured side by side in one run, on the same server.

    python benchmarks/kvtc_ttft.py [--ratio 8] [--prompt-tokens 2048] [--trials 3]

Writes results/kvtc/ttft.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _post(url, payload=None, timeout=900):
    req = urllib.request.Request(url, data=json.dumps(payload or {}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--ratio", type=float, default=8.0)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--out", default="results/kvtc/ttft")
    args = ap.parse_args()

    from kvsqueeze import corpus
    from kvsqueeze.backends.sglang.server import SGLangServer, free_port
    from kvsqueeze.backends.sglang.serving import kvtc_store_args
    from kvsqueeze.methods.kvtc.calibrate import calibration_for
    from kvsqueeze.model import load_hf, resolve_model

    tok, model = load_hf(resolve_model(None))
    cal_path = str(calibration_for(model, tok, given=args.calibration))
    segs = corpus.token_segments(corpus.heldout_documents(), tok, args.prompt_tokens, args.trials)
    del model
    work = Path(tempfile.mkdtemp(prefix="kvtc-ttft-"))
    stats_file = work / "stats.json"
    srv = SGLangServer(model=resolve_model(None), port=free_port(), log_path=work / "server.log",
                       extra_args=kvtc_store_args(cal_path, args.ratio, stats_file=str(stats_file),
                                                  page_size=args.page_size)
                       + ["--max-total-tokens", str(max(16384, 4 * args.prompt_tokens))])
    rows = []
    srv.start()
    try:
        srv.wait_ready(timeout=600)
        _post(srv.url + "/generate", {"text": "warm up", "sampling_params": {"max_new_tokens": 1}})
        for i, (_, ids) in enumerate(segs):
            body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
            t0 = time.perf_counter()
            cold = json.loads(_post(srv.url + "/generate", body))
            t_cold = time.perf_counter() - t0
            t1 = time.perf_counter()
            _post(srv.url + "/flush_cache?timeout=900")
            t_flush = time.perf_counter() - t1
            before = json.loads(stats_file.read_text())
            t0 = time.perf_counter()
            warm = json.loads(_post(srv.url + "/generate", body))
            t_warm = time.perf_counter() - t0
            after = json.loads(stats_file.read_text())
            det = warm["meta_info"].get("cached_tokens_details") or {}
            row = {"trial": i, "prompt_tokens": cold["meta_info"]["prompt_tokens"],
                   "ttft_recompute_s": t_cold, "ttft_restore_s": t_warm, "ratio": t_warm / t_cold,
                   "restored_tokens": det.get("storage", 0), "flush_and_store_s": t_flush,
                   "decode_s_in_restore": after["restore_seconds"] - before["restore_seconds"],
                   "same_first_token": cold["text"] == warm["text"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            _post(srv.url + "/flush_cache?timeout=900")
        store = json.loads(stats_file.read_text())
    finally:
        srv.stop()
    med_c = statistics.median(r["ttft_recompute_s"] for r in rows)
    med_w = statistics.median(r["ttft_restore_s"] for r in rows)
    summary = {"ttft_recompute_median_s": med_c, "ttft_restore_median_s": med_w, "restore_over_recompute": med_w / med_c,
               "store": store, "ratio_target": args.ratio, "page_size": args.page_size,
               "prompt_tokens": args.prompt_tokens, "calibration": method.calibration.fingerprint(),
               "machine": "2-core x86-64 CPU, SGLang 0.5.23 torch_native float32"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    lines = ["# TTFT: prefix restored from KVTC storage vs recomputed (SGLang CPU server)", "",
             f"Embedded model, {args.prompt_tokens}-token held-out prompts, KVTC {args.ratio:g}x pages of "
             f"{args.page_size} tokens, max_new_tokens=1; cold then restored, same server, same run. "
             "Server with kvsqueeze's plugin (CPU shims: prefix-aware extend attention, storage-wait "
             "yield); the codec in the storage tier's worker processes (default 2).", "",
             "| trial | prompt tokens | recompute s | restore s | restore/recompute | restored tokens | decode s | same token |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trial']} | {r['prompt_tokens']} | {r['ttft_recompute_s']:.2f} | {r['ttft_restore_s']:.2f} | "
                     f"{r['ratio']:.2f} | {r['restored_tokens']} | {r['decode_s_in_restore']:.2f} | {r['same_first_token']} |")
    lines += ["", f"Median: recompute {med_c:.2f} s, restore {med_w:.2f} s, ratio {med_w / med_c:.2f}. "
              f"Store: {store['pages_held']} pages, {store['ratio']:.2f}x, "
              f"{store['restore_seconds'] / max(store['hits'], 1) * 1000:.0f} ms decode per page hit."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
