"""DMS with SGLang's radix cache: W threads per question sharing their prompt, same KV budget, one run.

Every server gets the same ``--max-total-tokens`` budget and the same questions: a held-out-text prompt
each, sent as one ``n=W`` request (SGLang caches the prompt, then runs the W threads from it), all
questions at once. Servers: vanilla SGLang (radix cache on) and DMS with the shipped gates (radix cache
and chunked prefill on, as ``kvsqueeze serve --method dms:R`` runs it), one after the other.

Reported per server: questions running at once (peak running requests / W, from ``/metrics`` polled
every 0.2 s), output tokens/s over the burst, KV held per question (bytes: vanilla the prompt once plus
every thread's tokens; DMS from the server's per-request figures, the shared prefix once plus each
thread's own), retractions, failures; and, with one question alone (nothing memory-bound), the decode
step time: ``(time of an n=W request for L tokens - time for 1 token) / (L - 1)``, the prompt cached.

    python benchmarks/dms_shared_prompt.py [--budget 4096] [--questions 12] [--W 4]
                                           [--prompt-tokens 512] [--L 256] [--ratios 4,8]
                                           [--vanilla-questions N]

``--vanilla-questions`` gives vanilla the first N questions only (default: all): its questions at once
are bounded by the budget long before a run with enough questions for DMS 8x is over, and the
vanilla run is the slowest.

Targets: DMS holds at least 0.8 x its achieved ratio times as many questions at once as vanilla; its
decode step is at most 1.2x vanilla's.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvsqueeze import corpus  # noqa: E402
from kvsqueeze.backends.sglang import dms as sg_dms  # noqa: E402
from kvsqueeze.backends.sglang.server import SGLangServer, free_port, post_json  # noqa: E402
from kvsqueeze.backends.sglang.serving import ServeContext, parse_server, plan_server  # noqa: E402
from kvsqueeze.harness import axes  # noqa: E402
from kvsqueeze.harness.scrape import MetricsScraper  # noqa: E402
from kvsqueeze.methods.dms.checkpoint import shipped_gates_dir  # noqa: E402
from kvsqueeze.model import resolve_model  # noqa: E402


def ask(url, ids, W, L, temperature=0.7):
    return post_json(url + "/generate", {"input_ids": ids, "sampling_params": {
        "n": W, "max_new_tokens": L, "temperature": temperature, "ignore_eos": True}},
        timeout=3600)


def run_server(name, model, args, env, prompts, W, L, log_dir: Path, layers, kv_heads, bytes_per_token):
    log_path = log_dir / f"server-{name.replace(' ', '-')}.log"
    srv = SGLangServer(model=model, port=free_port(), extra_args=args, env=env, log_path=log_path)
    print(f"[{name}] starting SGLang {' '.join(args)}", flush=True)
    srv.start_and_wait(timeout=400)
    try:
        # one question alone: the decode step time (its prompt cached by the first call)
        ask(srv.url, prompts[0], W, 1)
        t0 = time.monotonic()
        ask(srv.url, prompts[0], W, 1)
        one = time.monotonic() - t0
        t0 = time.monotonic()
        ask(srv.url, prompts[0], W, L)
        step_s = (time.monotonic() - t0 - one) / (L - 1)
        print(f"[{name}] decode step with {W} threads of one question: {step_s * 1e3:.1f} ms", flush=True)
        scraper = MetricsScraper(srv.url, interval=0.2).start()
        t0 = time.monotonic()
        done = [0]

        def one_question(i):
            try:
                out = ask(srv.url, prompts[i], W, L)
            except Exception as e:  # noqa: BLE001 - reported per question
                return {"error": repr(e)}
            done[0] += 1
            print(f"[{name}] {done[0]}/{len(prompts)} questions after {time.monotonic() - t0:.0f}s", flush=True)
            return out

        with ThreadPoolExecutor(len(prompts)) as ex:
            outs = list(ex.map(one_question, range(len(prompts))))
        wall = time.monotonic() - t0
        server = scraper.stop()
    finally:
        srv.stop()
    ok = [o for o in outs if isinstance(o, list) and all(
        (s["meta_info"].get("finish_reason") or {}).get("type") != "abort" for s in o)]
    gen = sum(s["meta_info"]["completion_tokens"] for o in ok for s in o)
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    retracted = sum(int(m) for m in re.findall(r"#retracted_reqs: (\d+)", text))
    peaks, ratios = [], []
    for o in ok:
        rows = []
        for s in o:
            d = (s["meta_info"].get(sg_dms.META_KEY) or [None])[0]
            rows.append({"prompt_tokens": s["meta_info"]["prompt_tokens"],
                         "output_tokens": s["meta_info"]["completion_tokens"],
                         "kv_held_peak_server": d["kv_tokens_held_peak"] if d else None,
                         "kv_shared_server": d["kv_tokens_prefix_shared"] if d else None})
            if d:
                ratios.append(d["dense_tokens"] / d["held_tokens"])
        peaks.append(axes.question_peak_tokens(rows, layers, kv_heads, shares_prompt=True))
    peak_q = sum(peaks) / len(peaks) if peaks else float("nan")
    running = server.get("peak sglang:num_running_reqs") or 0
    res = {"name": name, "server_args": args, "questions": len(prompts), "W": W, "L": L,
           "failed": len(prompts) - len(ok), "retractions": retracted, "wall_s": round(wall, 1),
           "output_tokens": gen, "output_tok_per_s": round(gen / wall, 2),
           "peak_running_requests": running, "peak_questions_at_once": round(running / W, 2),
           "kv_tokens_per_question": round(peak_q, 1),
           "kv_mb_per_question": round(peak_q * bytes_per_token / 1e6, 2),
           "achieved_ratio_per_thread": round(sum(ratios) / len(ratios), 3) if ratios else 1.0,
           "decode_step_ms_one_question": round(step_s * 1e3, 1),
           "cached_tokens_per_thread": round(sum(s["meta_info"].get("cached_tokens", 0) for o in ok for s in o)
                                             / max(1, sum(len(o) for o in ok)), 1),
           "errors": [o["error"] for o in outs if isinstance(o, dict)][:3]}
    print(f"[{name}] {len(ok)}/{len(prompts)} questions ok, {wall:.1f}s, {res['output_tok_per_s']} tok/s, "
          f"{res['peak_questions_at_once']} questions at once, {peak_q:.0f} KV tokens per question", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=4096, help="--max-total-tokens of every server")
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--W", type=int, default=4, help="threads per question (n)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--L", type=int, default=256, help="tokens each thread generates")
    ap.add_argument("--ratios", default="4,8", help="shipped DMS gates to run beside vanilla")
    ap.add_argument("--vanilla-questions", type=int, default=None,
                    help="questions vanilla gets (the first N; default: all)")
    ap.add_argument("--out", default=str(ROOT / "results" / "dms" / "shared-prompt"))
    a = ap.parse_args()
    ratios = [int(r) for r in a.ratios.split(",") if r]
    for r in ratios:
        if not shipped_gates_dir(r).is_dir():
            raise SystemExit(f"--ratios: no shipped gates for {r}x (expected 4 or 8)")
    if a.W < 1 or a.L < 2 or a.questions < 1:
        raise SystemExit("--W >= 1, --L >= 2 and --questions >= 1 expected")
    vq = a.questions if a.vanilla_questions is None else a.vanilla_questions
    if not 1 <= vq <= a.questions:
        raise SystemExit(f"--vanilla-questions {vq}: expected 1 to --questions ({a.questions})")

    from transformers import AutoConfig, AutoTokenizer

    model = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(model)
    cfg = AutoConfig.from_pretrained(model)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    bytes_per_token = layers * kv_heads * head_dim * 2 * 4  # K+V, float32
    segs = corpus.token_segments(corpus.heldout_documents(), tok, a.prompt_tokens, a.questions,
                                 what="held-out text")
    prompts = [list(w) for _, w in segs]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.parent / f"{out.name}-logs"
    logs.mkdir(exist_ok=True)
    base = ["--enable-metrics", "--max-total-tokens", str(a.budget), "--disable-overlap-schedule"]
    t0 = time.monotonic()
    vanilla = run_server("vanilla", model, base, {}, prompts[:vq], a.W, a.L, logs, layers, kv_heads,
                         bytes_per_token)
    runs = [vanilla]
    for r in ratios:
        plan = plan_server(parse_server(f"dms:{r:g}"), ServeContext(model=Path(model)), base)
        res = run_server(f"dms {r}x", model, plan.args + base, plan.env, prompts, a.W, a.L, logs, layers,
                         kv_heads, bytes_per_token)
        res["gates"] = r
        v = vanilla["peak_questions_at_once"]
        res["questions_ratio"] = round(res["peak_questions_at_once"] / v, 3) if v else None
        res["kv_per_question_ratio"] = round(vanilla["kv_tokens_per_question"] / res["kv_tokens_per_question"], 3)
        res["target_questions_ratio"] = round(0.8 * res["kv_per_question_ratio"], 3)
        res["throughput_ratio"] = round(res["output_tok_per_s"] / vanilla["output_tok_per_s"], 3)
        res["decode_step_ratio"] = round(res["decode_step_ms_one_question"] / vanilla["decode_step_ms_one_question"], 3)
        runs.append(res)
    summary = {"budget_tokens": a.budget, "questions": a.questions, "vanilla_questions": vq, "W": a.W,
               "prompt_tokens": a.prompt_tokens,
               "L": a.L, "kv_bytes_per_dense_token": bytes_per_token, "total_s": round(time.monotonic() - t0, 1),
               "command": "python benchmarks/dms_shared_prompt.py " + " ".join(sys.argv[1:]), "servers": runs}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    rows = ["| server | questions | failed | retractions | questions at once | x vanilla (target) | KV per question, tokens "
            "(MB) | KV ratio per question | output tok/s (x) | decode step, one question (x) | cached per thread |",
            "|" + "---|" * 11]
    for r in runs:
        rows.append(f"| {r['name']} | {r['questions']} | {r['failed']} | {r['retractions']} | {r['peak_questions_at_once']} | "
                    f"{r.get('questions_ratio', '-')} ({r.get('target_questions_ratio', '-')}) | "
                    f"{r['kv_tokens_per_question']} ({r['kv_mb_per_question']}) | {r.get('kv_per_question_ratio', 1.0)} | "
                    f"{r['output_tok_per_s']} ({r.get('throughput_ratio', 1.0)}) | "
                    f"{r['decode_step_ms_one_question']} ms ({r.get('decode_step_ratio', 1.0)}) | "
                    f"{r['cached_tokens_per_thread']} |")
    md = [f"# DMS with the radix cache: {a.W} threads per question sharing their prompt, same KV budget "
          f"({a.budget} dense tokens)", "", f"`{summary['command']}`", "",
          f"{a.questions} questions (vanilla: the first {vq}), each a held-out-text prompt of {a.prompt_tokens} "
          f"tokens sent as one "
          f"n={a.W} request ({a.L} new tokens per thread, temperature 0.7, ignore_eos), all at once; CPU, "
          f"embedded SmolLM2-135M, float32 KV ({bytes_per_token} bytes per dense token); servers one after "
          "the other in one run, radix cache on in all. Questions at once: peak running requests / W "
          "(`/metrics`, every 0.2 s). KV per question: vanilla the prompt once plus each thread's tokens; "
          "DMS the server's figures (the shared prefix once plus each thread's own peak). Decode step: one "
          f"question alone (n={a.W}, prompt cached), (time for {a.L} tokens - time for 1) / {a.L - 1}. "
          "Targets: questions at once >= 0.8 x the KV ratio per question; decode step <= 1.2x vanilla's.",
          "", *rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
