"""DMS inside SGLang under load: same KV memory budget, vanilla vs DMS 4x vs DMS 8x, one run.

SGLang servers (CPU, embedded model) with the same ``--max-total-tokens`` budget (for DMS: the same
bytes as per-head pages, ``kvsqueeze/backends/sglang/dms.py``), each sent the same burst of requests
at once: held-out text prompts, long greedy generations (``ignore_eos``). ``/metrics`` is polled every
0.2 s. Reported per server: peak running requests, peak KV in use (dense-token equivalents and bytes),
KV bytes held per token at the end of each request, output tokens/s, failures (errors or aborts),
retractions; ratios against vanilla, and the run's achieved compression (dense / held).

    python benchmarks/dms_serving.py [--budget 4096] [--requests 32] [--prompt-tokens 256]
                                     [--max-new 512] [--ratios 4,8]

Target: peak concurrency >= 0.8 x CR x vanilla's, and no request fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvsqueeze import corpus  # noqa: E402
from kvsqueeze.backends.sglang import dms as sg_dms  # noqa: E402
from kvsqueeze.backends.sglang.server import (SGLangServer, free_port, generate_burst,  # noqa: E402
                                               post_json)
from kvsqueeze.backends.sglang.serving import ServeContext, parse_server, plan_server  # noqa: E402
from kvsqueeze.harness.scrape import MetricsScraper  # noqa: E402
from kvsqueeze.model import resolve_model  # noqa: E402


def run_server(name, model, args, env, prompts, max_new, log_dir: Path, bytes_per_token: int) -> dict:
    log_path = log_dir / f"server-{name.replace(' ', '-')}.log"
    srv = SGLangServer(model=model, port=free_port(), extra_args=args, env=env, log_path=log_path)
    print(f"[{name}] starting SGLang {' '.join(args)}", flush=True)
    srv.start_and_wait(timeout=400)
    try:
        post_json(srv.url + "/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 2}})
        scraper = MetricsScraper(srv.url, interval=0.2).start()
        outs, wall = generate_burst(srv.url, prompts, max_new, name, every=4)
        server = scraper.stop()
    finally:
        srv.stop()
    ok = [o for o in outs if "error" not in o and (o["meta_info"].get("finish_reason") or {}).get("type")
          != "abort"]
    gen = sum(o["meta_info"]["completion_tokens"] for o in ok)
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    retracted = sum(int(m) for m in re.findall(r"#retracted_reqs: (\d+)", text))
    dms = [o["meta_info"].get(sg_dms.META_KEY, [None])[0] for o in ok]
    dms = [d for d in dms if d]
    if dms:  # bytes held at each request's end, per token of it
        per_token = sum(d["held_tokens"] / d["dense_tokens"] for d in dms) / len(dms) * bytes_per_token
        ratio = sum(d["dense_tokens"] for d in dms) / sum(d["held_tokens"] for d in dms)
    else:
        per_token, ratio = float(bytes_per_token), 1.0
    peak_used = server.get("peak sglang:num_used_tokens")
    res = {"name": name, "server_args": args, "requests": len(prompts), "failed": len(prompts) - len(ok),
           "retractions": retracted, "wall_s": round(wall, 2), "output_tokens": gen,
           "output_tok_per_s": round(gen / wall, 2),
           "peak_running_requests": server.get("peak sglang:num_running_reqs"),
           "peak_kv_tokens_used": peak_used,
           "peak_kv_mb": round(peak_used * bytes_per_token / 1e6, 1) if peak_used is not None else None,
           "max_total_tokens": server.get("last sglang:max_total_num_tokens"),
           "kv_bytes_per_token_at_end": round(per_token), "achieved_ratio": round(ratio, 3),
           "kept_fraction": server.get("last kvsqueeze_dms_kept_fraction"),
           "peak_sequences_in_pool": server.get("last kvsqueeze_dms_peak_sequences"),
           "mean_e2e_s": round(sum(o["meta_info"].get("e2e_latency", 0) for o in ok) / max(1, len(ok)), 2),
           "errors": [o["error"] for o in outs if "error" in o][:3]}
    if dms:
        res["reads_per_step"] = round(sum(d["reads_per_step"] for d in dms) / len(dms), 1)
        res["dense_reads_per_step"] = round(sum(d["dense_reads_per_step"] for d in dms) / len(dms), 1)
    print(f"[{name}] {len(ok)}/{len(prompts)} ok, {wall:.1f}s, {res['output_tok_per_s']} tok/s, "
          f"peak running {res['peak_running_requests']}, peak KV tokens {peak_used}, ratio {ratio:.2f}",
          flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=4096, help="--max-total-tokens of every server")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument("--ratios", default="4,8", help="shipped DMS gates to run beside vanilla")
    ap.add_argument("--out", default=str(ROOT / "results" / "dms" / "serving"))
    a = ap.parse_args()
    ratios = [int(r) for r in a.ratios.split(",") if r]
    for r in ratios:
        if not shipped_gates_dir(r).is_dir():
            raise SystemExit(f"--ratios: no shipped gates for {r}x (expected 4 or 8)")

    from transformers import AutoConfig, AutoTokenizer

    model = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(model)
    cfg = AutoConfig.from_pretrained(model)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    bytes_per_token = cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * 4  # K+V, float32
    segs = corpus.token_segments(corpus.heldout_documents(), tok, a.prompt_tokens, a.requests,
                                 what="held-out text")
    prompts = [list(w) for _, w in segs]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.parent / f"{out.name}-logs"  # the default out, results/dms/serving: serving-logs
    logs.mkdir(exist_ok=True)
    base = ["--enable-metrics", "--max-total-tokens", str(a.budget), "--disable-radix-cache"]
    t0 = time.monotonic()
    vanilla = run_server("vanilla", model, base, {}, prompts, a.max_new, logs, bytes_per_token)
    runs = [vanilla]
    for r in ratios:
        plan = plan_server(parse_server(f"dms:{r:g}"), ServeContext(model=Path(model)), base)
        res = run_server(f"dms {r}x", model, plan.args + base, plan.env, prompts, a.max_new, logs,
                         bytes_per_token)
        res["gates"] = r
        v = vanilla["peak_running_requests"]
        res["concurrency_ratio"] = round(res["peak_running_requests"] / v, 3) if v else None
        res["throughput_ratio"] = round(res["output_tok_per_s"] / vanilla["output_tok_per_s"], 3) \
            if vanilla["output_tok_per_s"] else None
        res["target_concurrency_ratio"] = round(0.8 * res["achieved_ratio"], 3)
        res["target_met"] = bool(res["concurrency_ratio"] is not None and res["failed"] == 0
                                 and res["concurrency_ratio"] >= res["target_concurrency_ratio"])
        runs.append(res)
    summary = {"budget_tokens": a.budget, "requests": a.requests, "prompt_tokens": a.prompt_tokens,
               "max_new_tokens": a.max_new, "kv_bytes_per_dense_token": bytes_per_token,
               "total_s": round(time.monotonic() - t0, 1), "servers": runs}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    rows = ["| server | failed | retractions | peak running | peak KV tokens (MB) | KV bytes/token at end "
            "| achieved ratio | output tok/s | concurrency x | target (0.8 x ratio) | tok/s x |",
            "|" + "---|" * 11]
    for r in runs:
        rows.append(f"| {r['name']} | {r['failed']} | {r['retractions']} | {r['peak_running_requests']:.0f} | "
                    f"{r['peak_kv_tokens_used']:.0f} ({r['peak_kv_mb']}) | {r['kv_bytes_per_token_at_end']} | "
                    f"{r['achieved_ratio']} | {r['output_tok_per_s']} | {r.get('concurrency_ratio', '-')} | "
                    f"{r.get('target_concurrency_ratio', '-')} | {r.get('throughput_ratio', '-')} |")
    md = [f"# DMS in SGLang: same KV memory budget ({a.budget} dense tokens), vanilla vs DMS", "",
          f"`python benchmarks/dms_serving.py --budget {a.budget} --requests {a.requests} --prompt-tokens "
          f"{a.prompt_tokens} --max-new {a.max_new} --ratios {a.ratios}`", "",
          f"{a.requests} held-out-text prompts of {a.prompt_tokens} tokens, {a.max_new} new tokens each "
          "(greedy, ignore_eos), sent at once to each server; CPU, embedded SmolLM2-135M, float32 KV "
          f"({bytes_per_token} bytes per dense token), servers one after the other in one run. DMS servers "
          "hold the same bytes as per-head pages (shipped gates). Peak running requests and KV in use from "
          "`/metrics` (polled every 0.2 s; for DMS, pages in use in dense-token equivalents); KV bytes per "
          "token and achieved ratio (dense / held) from each request's `meta_info` at its end.", "", *rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
