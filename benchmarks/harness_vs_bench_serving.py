"""The harness against SGLang's own benchmark client on one configuration: TTFT, TPOT and output
throughput of the same prompts, the same concurrency and the same output length against one server.

One vanilla CPU SGLang server (the embedded model). The questions of ``kvsqueeze bench`` (``--task``,
``--questions``) are written as a ShareGPT-format file for SGLang's client; both clients send every
prompt once, ``--concurrency`` at a time, each generating exactly ``--tokens`` tokens (ignore_eos),
temperature 0, with the device prefix cache flushed before each client. Order: harness, SGLang's
client, harness again (the two harness runs bracket any drift of the machine), without polling the
server's ``/metrics`` in between (SGLang's client does not poll); then the harness as ``kvsqueeze bench``
runs it (polling every 0.5 s), which shows what polling costs a 2-core server. SGLang's client runs
as ``python -m kvsqueeze.backends.sglang.bench_serving`` (its own code, with kvsqueeze's torchvision
shim first).

Definitions compared: TTFT median (request sent -> first token; SGLang's client: the first chunk,
the harness: the first chunk with text), TPOT median (per request ``(latency - TTFT) / (tokens - 1)``
in both), output throughput (output tokens over the run's span; SGLang's client: over its benchmark
duration, which starts when its first request is sent).

    python benchmarks/harness_vs_bench_serving.py [--questions 12] [--concurrency 4] [--tokens 32]

At a concurrency above 1 the TTFT median depends on which prompts share a prefill batch, and SGLang's
client shuffles the prompts (the harness sends them in order): ``--concurrency 1`` is the comparison
that does not depend on the order.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import write  # noqa: E402
from kvsqueeze.backends.sglang.server import SGLangServer, free_port  # noqa: E402
import pandas as pd  # noqa: E402

from kvsqueeze.harness.plan import Plan  # noqa: E402
from kvsqueeze.harness.scrape import post as _post  # noqa: E402
from kvsqueeze.harness.sweep import run_config  # noqa: E402
from kvsqueeze.harness.tasks import make_questions  # noqa: E402
from kvsqueeze.model import resolve_model  # noqa: E402


def harness_run(url, questions, args, work: Path, poll: float | None) -> dict:
    _post(url + "/flush_cache?timeout=300", timeout=400)
    plan = Plan(url=url, W=1, L=args.tokens, temperature=0.0, questions=[q.to_dict() for q in questions],
                run="cmp", method="none", users=args.concurrency, ignore_eos=True)
    res = run_config(plan, work, 900, log=lambda m: None, scrape_interval=poll)
    df = pd.read_csv(work / "requests.csv", dtype={"extracted": str, "answer": str, "text": str})
    ok = df[df["ok"] == 1]
    span = float((ok["start_unix"] + ok["e2e_s"]).max() - ok["start_unix"].min())
    return {"status": res.status, "samples": int(len(ok)), "median_ttft_ms": 1000 * float(ok["ttft_s"].median()),
            "median_tpot_ms": 1000 * float(ok["tpot_s"].median()),
            "output_throughput": float(ok["output_tokens"].sum() / span),
            "output_tokens": int(ok["output_tokens"].sum())}


def sglang_client(url, questions, args, work: Path, model_path) -> dict:
    _post(url + "/flush_cache?timeout=300", timeout=400)
    data = work / "prompts-sharegpt.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": q.prompt},
                                                   {"from": "gpt", "value": "x"}]} for q in questions]))
    out = work / "bench_serving.jsonl"
    cmd = [sys.executable, "-m", "kvsqueeze.backends.sglang.bench_serving", "--backend", "sglang",
           "--base-url", url, "--dataset-name", "sharegpt", "--dataset-path", str(data),
           "--num-prompts", str(len(questions)), "--sharegpt-output-len", str(args.tokens),
           "--max-concurrency", str(args.concurrency), "--request-rate", "inf", "--tokenizer", str(model_path),
           "--model", str(model_path), "--output-file", str(out), "--disable-tqdm", "--seed", "0",
           "--temperature", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    (work / "bench_serving.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"sglang.bench_serving failed ({proc.returncode}); see {work / 'bench_serving.log'}")
    rec = json.loads(out.read_text().strip().splitlines()[-1])
    return {k: rec.get(k) for k in ("completed", "median_ttft_ms", "median_tpot_ms", "output_throughput",
                                    "total_output_tokens", "duration")} | {"command": " ".join(cmd[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="needle")
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "results/harness/vs-bench-serving"))
    args = ap.parse_args()
    model_path = resolve_model(None)
    questions = make_questions([args.task], args.questions, seed=0, split="dev")
    work = Path(tempfile.mkdtemp(prefix="kvsq-cmp-"))
    srv = SGLangServer(model=model_path, port=free_port(), extra_args=["--enable-metrics"],
                       log_path=work / "server.log")
    srv.start_and_wait(timeout=400)
    try:
        t0 = time.time()
        first = harness_run(srv.url, questions, args, work / "harness-1", None)
        ref = sglang_client(srv.url, questions, args, work, model_path)
        second = harness_run(srv.url, questions, args, work / "harness-2", None)
        polled = harness_run(srv.url, questions, args, work / "harness-polled", 0.5)
        wall = time.time() - t0
    finally:
        srv.stop()
    keys = (("median_ttft_ms", "TTFT median, ms"), ("median_tpot_ms", "TPOT median, ms"),
            ("output_throughput", "output tok/s"))
    rows = []
    for k, name in keys:
        h = (first[k] + second[k]) / 2
        rows.append({"figure": name, "harness_1": first[k], "sglang_bench_serving": ref[k], "harness_2": second[k],
                     "harness_mean": h, "diff_pct": 100 * (h - ref[k]) / ref[k], "polled": polled[k]})
    cmd = "python benchmarks/harness_vs_bench_serving.py " + " ".join(sys.argv[1:])
    lines = ["# The harness against SGLang's own benchmark client, one configuration", "",
             f"`{cmd.strip()}` ({wall:.0f} s)", "",
             f"{args.questions} `{args.task}` prompts (dev split, ~680 tokens), {args.concurrency} at a time, "
             f"{args.tokens} tokens each (ignore_eos), temperature 0, one vanilla CPU SGLang server "
             "(embedded model), prefix cache flushed before each client; order: harness, SGLang's client "
             f"(`python -m kvsqueeze.backends.sglang.bench_serving`, {ref['completed']} completed), harness "
             "again, the harness with neither polling `/metrics` in between (SGLang's client does not poll); "
             "last, the harness as `kvsqueeze bench` runs it, polling `/metrics` every 0.5 s.", "",
             "| figure | harness (1st) | sglang.bench_serving | harness (2nd) | harness mean vs SGLang's | "
             "harness polling /metrics every 0.5 s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['figure']} | {r['harness_1']:.1f} | {r['sglang_bench_serving']:.1f} | "
                     f"{r['harness_2']:.1f} | {r['diff_pct']:+.1f}% | {r['polled']:.1f} "
                     f"({100 * (r['polled'] - r['sglang_bench_serving']) / r['sglang_bench_serving']:+.1f}%) |")
    lines += ["", "Definitions: TTFT from the request being sent to its first streamed chunk with text (SGLang's "
              "client: its first chunk); TPOT per request `(latency - TTFT) / (output tokens - 1)`, median over "
              "requests, in both; output throughput: output tokens over the span from the first request sent "
              "to the last finished (SGLang's client: over its benchmark duration). Output tokens: "
              f"{first['output_tokens']} and {second['output_tokens']} (harness, from the server's usage), "
              f"{ref['total_output_tokens']} (SGLang's client)."]
    write(args.out, {"command": cmd.strip(), "harness_1": first, "harness_2": second, "sglang_bench_serving": ref,
                     "harness_polled": polled,
                     "rows": rows}, lines)


if __name__ == "__main__":
    main()
