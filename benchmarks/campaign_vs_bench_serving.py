"""A campaign point against SGLang's own client: ShareGPT at a Poisson request rate, the same prompts,
the same arrival times, one vanilla server.

One vanilla CPU SGLang server (the embedded model, ``--budget`` KV tokens). The complete ShareGPT
records are written as a valid JSON file for SGLang's client (the packaged file is cut off). For each
rate, both clients send the same ``--requests`` prompts (SGLang's sampler and kvsqueeze's ``sharegpt``
workload pick the same ones for the same seed and context: a test checks it), each generating exactly
``--tokens`` tokens (``--sharegpt-output-len`` / ``sharegpt:output=``; ignore_eos), temperature 0, at
the same arrival times: SGLang's client draws its gaps with ``numpy.random.exponential`` after
``numpy.random.seed(seed)``, and the kvsqueeze point is given that schedule (``numpy``'s legacy
generator, same seed; its own default draws with Python's ``random``). The device prefix cache is
flushed before each run; neither client polls ``/metrics``. Order per rate: kvsqueeze, SGLang's,
kvsqueeze, SGLang's, ... (``--repeats`` each, interleaved, so the machine's drift falls on both);
each figure is compared as the median of each client's runs, with the runs' range beside it (on this
2-core machine one client's runs differ by a fifth from one to the next).

Compared (both clients' own definitions, which agree: docs/metrics.md): TTFT, TPOT and ITL medians,
request throughput and output throughput (completed requests and output tokens over the duration from
the first send to the last end). SGLang's client also sends one warm-up request before its run (its
first prompt, at most 32 tokens), which leaves that prompt in the prefix cache; kvsqueeze's point does not.

    python benchmarks/campaign_vs_bench_serving.py [--rates 0.1,0.25] [--requests 24] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._results import write  # noqa: E402
from kvsqueeze.backends.sglang.serving import parse_server  # noqa: E402
from kvsqueeze.harness import measure  # noqa: E402
from kvsqueeze.harness.campaign import run_point  # noqa: E402
from kvsqueeze.harness.scrape import post  # noqa: E402
from kvsqueeze.harness.servers import start_server  # noqa: E402
from kvsqueeze.harness.traffic import PointPlan, read_rows  # noqa: E402
from kvsqueeze.harness.workloads import WorkloadContext, parse_workload  # noqa: E402
from kvsqueeze.harness.workloads.sharegpt import write_complete  # noqa: E402
from kvsqueeze.model import resolve_model  # noqa: E402

FIGURES = (("median TTFT (ms)", "median_ttft_ms", "ttft_s_p50", 1000), ("median TPOT (ms)", "median_tpot_ms",
                                                                        "tpot_s_p50", 1000),
           ("median ITL (ms)", "median_itl_ms", "itl_s_p50", 1000),
           ("request throughput (req/s)", "request_throughput", "requests_per_s", 1),
           ("output throughput (tok/s)", "output_throughput", "output_tok_s", 1))


def sglang_schedule(rate: float, n: int, seed: int) -> list[float]:
    """SGLang's client's send times: first at 0, then numpy's legacy exponential gaps after seed()."""
    gaps = np.random.RandomState(seed).exponential(1.0 / rate, size=n - 1)
    return [0.0] + list(np.cumsum(gaps))


def ours(url, convs, rate, seed, model, work: Path) -> dict:
    post(url + "/flush_cache?timeout=300", timeout=400)
    plan = PointPlan(url=url, conversations=[c.to_dict() for c in convs], load="poisson", value=rate,
                     offsets=sglang_schedule(rate, len(convs), seed), warmup_s=0.0, max_time_s=1800,
                     tokenizer=str(model), seed=seed, run="cmp", method="none", point=f"rate={rate:g}",
                     workload="sharegpt")
    rec = run_point(plan, work, log=lambda m: None, scrape_interval=None)
    f = measure.point_figures(read_rows(work))
    return {"status": rec["status"], "completed": f["completed"],
            **{key: f[fig] * scale for _, key, fig, scale in FIGURES}, "lag_p99_ms": 1000 * f["lag_p99_s"]}


def theirs(url, data: Path, n, rate, seed, tokens, context, model, work: Path) -> dict:
    post(url + "/flush_cache?timeout=300", timeout=400)
    out = work / "bench_serving.jsonl"
    cmd = [sys.executable, "-m", "kvsqueeze.backends.sglang.bench_serving", "--backend", "sglang", "--base-url", url,
           "--dataset-name", "sharegpt", "--dataset-path", str(data), "--num-prompts", str(n),
           "--sharegpt-output-len", str(tokens), "--sharegpt-context-len", str(context), "--request-rate", str(rate),
           "--seed", str(seed), "--tokenizer", str(model), "--output-file", str(out), "--disable-tqdm"]
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    (work / "bench_serving.log").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"sglang.bench_serving failed ({proc.returncode}); see {work / 'bench_serving.log'}")
    rec = json.loads(out.read_text().strip().splitlines()[-1])
    return {"status": "complete", "completed": rec["completed"], **{key: rec[key] for _, key, _, _ in FIGURES}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="0.1,0.25")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--context", type=int, default=1024, help="prompt + output tokens at most (both samplers)")
    p.add_argument("--budget", type=int, default=8192)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs of each client per rate, interleaved")
    p.add_argument("--out", default="results/campaign/vs-bench-serving")
    a = p.parse_args(argv)
    rates = [float(r) for r in a.rates.split(",")]
    model = resolve_model(None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    convs = parse_workload(f"sharegpt:output={a.tokens}").conversations(a.requests, WorkloadContext(tok, a.context, a.seed))
    work = Path(tempfile.mkdtemp(prefix="campaign-vs-bench-"))
    data = write_complete(work / "sharegpt-complete.json")
    server = start_server(parse_server("none"), model, None, work / "logs", ["--max-total-tokens", str(a.budget)],
                          log=print)
    results = []
    try:
        for rate in rates:
            print(f"rate {rate:g}: kvsqueeze and SGLang's bench_serving, {a.repeats} runs each, interleaved", flush=True)
            runs = {"kvsqueeze": [], "bench_serving": []}
            for k in range(a.repeats):
                runs["kvsqueeze"].append(ours(server.url, convs, rate, a.seed, model, work / f"ours-{rate:g}-{k}"))
                runs["bench_serving"].append(theirs(server.url, data, a.requests, rate, a.seed, a.tokens, a.context,
                                                    model, work / f"theirs-{rate:g}-{k}"))
                print(json.dumps({"rate": rate, "run": k, "kvsqueeze": runs["kvsqueeze"][-1],
                                  "bench_serving": runs["bench_serving"][-1]}), flush=True)
            results.append({"rate": rate, **runs})
    finally:
        server.stop()
    command = "python benchmarks/campaign_vs_bench_serving.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"# A campaign point against SGLang's bench_serving ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `{command.strip()}`", "",
             f"One vanilla CPU SGLang server (SmolLM2-135M-Instruct, KV budget {a.budget} tokens); ShareGPT V3, the "
             f"same {a.requests} prompts in both clients (seed {a.seed}, prompt + output <= {a.context} tokens), "
             f"{a.tokens} output tokens each (ignore_eos), temperature 0, the same Poisson arrival times; per rate "
             f"{a.repeats} runs of each client, interleaved (kvsqueeze, SGLang's, kvsqueeze, ...); no /metrics "
             "polling. SGLang's client: "
             "`python -m kvsqueeze.backends.sglang.bench_serving --backend sglang --dataset-name sharegpt "
             f"--dataset-path <complete records> --num-prompts {a.requests} --sharegpt-output-len {a.tokens} "
             f"--sharegpt-context-len {a.context} --request-rate RATE --seed {a.seed}`.", ""]
    for r in results:
        lines += [f"## {r['rate']:g} requests/s", "",
                  "| figure | kvsqueeze median [runs' range] | bench_serving median [runs' range] | kvsqueeze vs "
                  "bench_serving |", "|---|---|---|---|"]
        for name, key, _, _ in FIGURES:
            ours_v = [x[key] for x in r["kvsqueeze"]]
            ref_v = [x[key] for x in r["bench_serving"]]
            m, ref = float(np.median(ours_v)), float(np.median(ref_v))
            lines.append(f"| {name} | {m:.2f} [{min(ours_v):.2f}, {max(ours_v):.2f}] | {ref:.2f} [{min(ref_v):.2f}, "
                         f"{max(ref_v):.2f}] | {100 * (m - ref) / ref:+.1f}% |")
        lines += ["", "Completed per run: kvsqueeze " + ", ".join(str(x["completed"]) for x in r["kvsqueeze"])
                  + "; bench_serving " + ", ".join(str(x["completed"]) for x in r["bench_serving"])
                  + "; kvsqueeze send lag p99 " + ", ".join(f"{x['lag_p99_ms']:.1f}" for x in r["kvsqueeze"]) + " ms.",
                  ""]
    write(a.out, {"command": command.strip(), "results": results, "requests": a.requests, "tokens": a.tokens,
                  "context": a.context, "budget": a.budget, "seed": a.seed, "repeats": a.repeats}, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
