"""Block fusion inside SGLang under load: same KV budget, radix alone vs radix + fusion, one run.

SGLang servers (CPU, embedded model) with the same ``--max-total-tokens`` budget and page size,
one vanilla (radix cache) and one per fusion setting (``kvsqueeze serve --method fusion``), each sent the same
burst of near-duplicate requests (``kvsqueeze.workload``: documents with small edits, chats that
diverge early; interleaved) all at once. ``/metrics`` is polled every 0.2 s. Reported per server: peak
running requests, peak KV tokens in use (physical pages), wall time, output tokens/s, failures; for
fusion also pages fused and the greedy outputs' agreement with vanilla's (same prompts, temperature 0).

    python benchmarks/fusion_serving.py [--budget 4096] [--requests 32] [--max-new 128]
                                        [--fusion block:0.95,token:0.9]

Target: more concurrent requests and output tokens/s at the same budget, no failures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvsqueeze.backends.sglang import fusion as sg_fusion  # noqa: E402
from kvsqueeze.backends.sglang.server import (SGLangServer, free_port, generate_burst,  # noqa: E402
                                               post_json)
from kvsqueeze.harness.scrape import MetricsScraper  # noqa: E402
from kvsqueeze.methods.fusion.config import FusionConfig  # noqa: E402
from kvsqueeze.model import resolve_model  # noqa: E402
from kvsqueeze.workload import near_duplicate_workload  # noqa: E402


def build_prompts(tok, n: int, prompt_tokens: int, page: int) -> list[list[int]]:
    per = max(2, n // 4)
    groups = []
    for kind in ("edits", "chat"):
        reqs = near_duplicate_workload(tok, kind, groups=2, per_group=per, prefix_tokens=prompt_tokens)
        for g in (0, 1):
            groups.append([list(r.prompt_ids) for r in reqs if r.group == g])
    # interleave the four groups, as independent users would arrive
    out = [grp[i] for i in range(per) for grp in groups][:n]
    return [p[: len(p) // page * page] for p in out]


def run_server(name, model, args, env, prompts, max_new, log_dir: Path, log=None) -> dict:
    log = log or (lambda msg: print(msg, flush=True))
    srv = SGLangServer(model=model, port=free_port(), extra_args=args, env=env,
                       log_path=log_dir / f"server-{name}.log")
    log(f"[{name}] starting SGLang {' '.join(args)}")
    srv.start_and_wait(timeout=400)
    try:
        post_json(srv.url + "/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 2}})
        scraper = MetricsScraper(srv.url, interval=0.2).start()
        outs, wall = generate_burst(srv.url, prompts, max_new, name, every=8, log=log)
        server = scraper.stop()
    finally:
        srv.stop()
    ok = [o for o in outs if "error" not in o]
    gen = sum(o["meta_info"]["completion_tokens"] for o in ok)
    res = {"name": name, "server_args": args, "requests": len(prompts), "failed": len(prompts) - len(ok),
           "wall_s": round(wall, 2), "output_tokens": gen, "output_tok_per_s": round(gen / wall, 2),
           "peak_running_requests": server.get("peak sglang:num_running_reqs"),
           "peak_kv_tokens_used": server.get("peak sglang:num_used_tokens"),
           "max_total_tokens": server.get("last sglang:max_total_num_tokens"),
           "mean_e2e_s": round(sum(o["meta_info"].get("e2e_latency", 0) for o in ok) / max(1, len(ok)), 2),
           "outputs": [o.get("text") for o in outs],
           "cached_tokens": sum(o["meta_info"].get("cached_tokens", 0) for o in ok)}
    fus = [o["meta_info"].get("kvsqueeze_fusion", [None])[0] for o in ok]
    if any(fus):
        res["own_pages"] = sum(f["pages"] for f in fus)
        res["fused_pages"] = sum(f["fused_pages"] for f in fus)
        res["pages_saved_at_end"] = server.get("last kvsqueeze_fusion_pages_saved")
    log(f"[{name}] {len(ok)}/{len(prompts)} ok, {wall:.1f}s, {res['output_tok_per_s']} tok/s, "
        f"peak running {res['peak_running_requests']}, peak KV tokens {res['peak_kv_tokens_used']}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=4096, help="--max-total-tokens of both servers")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--fusion", default="block:0.95,token:0.9",
                    help="fusion servers to run beside vanilla: SIMILARITY:THRESHOLD, comma-separated")
    ap.add_argument("--out", default=str(ROOT / "results" / "fusion" / "serving"))
    a = ap.parse_args()

    from transformers import AutoTokenizer

    model = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(model)
    prompts = build_prompts(tok, a.requests, a.prompt_tokens, a.page_size)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.parent / "serving-logs"
    logs.mkdir(exist_ok=True)
    args = ["--enable-metrics", "--page-size", str(a.page_size), "--max-total-tokens", str(a.budget)]
    settings = []
    for item in a.fusion.split(","):
        sim, _, th = item.partition(":")
        settings.append((sim, float(th)))
        FusionConfig(threshold=float(th), similarity=sim)  # bad settings fail before any server starts
    t0 = time.monotonic()
    vanilla = run_server("radix", model, args, {}, prompts, a.max_new, logs)
    runs = [vanilla]
    # vanilla again: how far greedy outputs move between two runs of the same server (batching)
    others = [("radix (again)", {}, None)] + [(f"radix+fusion {sim} {th:g}",
                                               sg_fusion.config_env(FusionConfig(threshold=th, similarity=sim)),
                                               (sim, th))
                                              for sim, th in settings]
    for name, env, setting in others:
        r = run_server(name, model, args, env, prompts, a.max_new, logs)
        if setting:
            r["similarity"], r["threshold"] = setting
        same, agree = 0, []
        for x, y in zip(vanilla["outputs"], r["outputs"]):
            if x is not None and y is not None:
                same += x == y
                xi, yi = tok(x).input_ids, tok(y).input_ids
                agree.append(sum(p == q for p, q in zip(xi, yi)) / max(1, len(xi)))
        r["identical_outputs"] = same
        r["mean_token_agreement"] = round(sum(agree) / len(agree), 4) if agree else None
        r["concurrency_ratio"] = round(r["peak_running_requests"] / vanilla["peak_running_requests"], 3) \
            if vanilla["peak_running_requests"] else None
        r["throughput_ratio"] = round(r["output_tok_per_s"] / vanilla["output_tok_per_s"], 3) \
            if vanilla["output_tok_per_s"] else None
        runs.append(r)
    summary = {
        "budget_tokens": a.budget, "page_size": a.page_size, "requests": a.requests,
        "prompt_tokens": a.prompt_tokens, "max_new_tokens": a.max_new,
        "total_s": round(time.monotonic() - t0, 1),
        "servers": [{k: v for k, v in r.items() if k != "outputs"} for r in runs],
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    rows = ["| server | failed | peak running | peak KV tokens | wall s | output tok/s | fused pages "
            "| concurrency x | tok/s x | outputs = vanilla | token agreement |", "|" + "---|" * 11]
    for r in runs:
        rows.append(f"| {r['name']} | {r['failed']} | {r['peak_running_requests']:.0f} | "
                    f"{r['peak_kv_tokens_used']:.0f} | {r['wall_s']} | {r['output_tok_per_s']} | "
                    f"{r.get('fused_pages', '-')} | {r.get('concurrency_ratio', '-')} | "
                    f"{r.get('throughput_ratio', '-')} | {r.get('identical_outputs', '-')} | "
                    f"{r.get('mean_token_agreement', '-')} |")
    md = [f"# Block fusion in SGLang: same KV budget ({a.budget} tokens), radix vs radix + fusion", "",
          f"`python benchmarks/fusion_serving.py --budget {a.budget} --requests {a.requests} "
          f"--max-new {a.max_new} --fusion {a.fusion}`", "",
          f"{a.requests} near-duplicate requests (edits + chat, {a.prompt_tokens}-token prompts, "
          f"{a.max_new} new tokens each, greedy, ignore_eos) sent at once; page size {a.page_size}; "
          "CPU, embedded SmolLM2-135M, all servers in one run, one after the other (vanilla twice: "
          "the second shows how much greedy outputs move between runs of the same server). Peak running "
          "requests and KV tokens in use from `/metrics` (polled every 0.2 s); ratios against radix; "
          "'outputs = vanilla': greedy continuations identical to the vanilla server's (of "
          f"{a.requests}); token agreement: share of positions with the same token.", "", *rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
