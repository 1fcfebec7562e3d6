"""DMS decode graphs on a CPU: SGLang's graph runner against eager decode, same server otherwise, one run.

Two DMS servers with the shipped gates (radix cache and chunked prefill on, as ``kvsqueeze serve
--method dms:R`` runs it), one after the other: eager decode, and decode graphs captured for
``--graph-bs`` (on a CPU SGLang's CPU graph runner: ``--enable-torch-compile``, the decode forward
compiled per captured batch size, replayed on the static slot tables). Each gets the same held-out
prompts, greedy, first one at a time (a batch of 1) and then all at once (a batch of ``--prompts``,
padded to the next captured size). Reported per server: start-up time (the capture included), the
decode step at each batch size, ``(time for L tokens - time for 1) / (L - 1)`` with the prompts
cached, and whether the greedy outputs of the two servers are equal.

    python benchmarks/dms_decode_graphs.py [--ratio 8] [--graph-bs 1,4] [--prompts 3]
                                           [--prompt-tokens 400] [--L 32] [--context-length 1024]

On a CPU the PyTorch attention path gathers the slot tables' full width, which in a graph is the
context length: ``--context-length`` bounds it.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._results import write  # noqa: E402
from kvsqueeze import corpus  # noqa: E402
from kvsqueeze.backends.sglang.server import SGLangServer, free_port, post_json  # noqa: E402
from kvsqueeze.backends.sglang.serving import ServeContext, parse_server, plan_server  # noqa: E402
from kvsqueeze.methods.dms.checkpoint import shipped_gates_dir  # noqa: E402
from kvsqueeze.model import resolve_model  # noqa: E402


def batch(url, prompts, L):
    """Greedy outputs of ``prompts`` sent at once, and the wall time."""
    def one(ids):
        return post_json(url + "/generate", {"input_ids": ids, "sampling_params": {
            "max_new_tokens": L, "temperature": 0, "ignore_eos": True}}, timeout=3600)

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(prompts)) as ex:
        outs = list(ex.map(one, prompts))
    return [o["output_ids"] for o in outs], time.monotonic() - t0


def run_server(name, model, args, env, prompts, L, log_dir: Path):
    log = log_dir / f"server-{name}.log"
    print(f"[{name}] starting SGLang {' '.join(args)}", flush=True)
    t0 = time.monotonic()
    srv = SGLangServer(model=model, port=free_port(), extra_args=args, env=env, log_path=log)
    srv.start_and_wait(timeout=3000)
    start_s = time.monotonic() - t0
    print(f"[{name}] ready after {start_s:.0f}s", flush=True)
    res = {"name": name, "server_args": args, "start_s": round(start_s, 1), "steps": {}, "outputs": {}}
    try:
        for label, groups in (("1", [[p] for p in prompts]), (str(len(prompts)), [prompts])):
            one = full = 0.0
            outs = []
            for g in groups:
                batch(srv.url, g, 1)  # the prompts cached
                one += batch(srv.url, g, 1)[1]
                o, t = batch(srv.url, g, L)
                full += t
                outs += o
            step = (full - one) / len(groups) / (L - 1)
            res["steps"][label] = round(step * 1e3, 1)
            res["outputs"][label] = outs
            print(f"[{name}] batch of {label}: decode step {step * 1e3:.1f} ms", flush=True)
    finally:
        srv.stop()
    text = log.read_text(errors="replace") if log.exists() else ""
    res["graph_steps"] = text.count("cpu graph: True")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=int, default=8, help="shipped DMS gates (4 or 8)")
    ap.add_argument("--graph-bs", default="1,4", help="decode batch sizes to capture")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=400)
    ap.add_argument("--L", type=int, default=32, help="greedy tokens per request")
    ap.add_argument("--context-length", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=8192, help="--max-total-tokens of both servers")
    ap.add_argument("--out", default=str(ROOT / "results" / "dms" / "decode-graphs-cpu"))
    a = ap.parse_args()
    sizes = [int(b) for b in a.graph_bs.split(",") if b]
    if not shipped_gates_dir(a.ratio).is_dir():
        raise SystemExit(f"--ratio: no shipped gates for {a.ratio}x (expected 4 or 8)")
    if a.L < 2 or a.prompts < 1 or not sizes or min(sizes) < 1 or a.prompts > max(sizes):
        raise SystemExit("--L >= 2, --prompts >= 1, --graph-bs positive sizes, the largest >= --prompts expected")
    if a.prompt_tokens + a.L > a.context_length:
        raise SystemExit(f"--prompt-tokens + --L = {a.prompt_tokens + a.L} exceeds --context-length "
                         f"{a.context_length}")

    from transformers import AutoTokenizer

    model = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [list(w) for _, w in corpus.token_segments(corpus.heldout_documents(), tok, a.prompt_tokens,
                                                         a.prompts, what="held-out text")]
    out = Path(a.out)
    logs = out.parent / f"{out.name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = ["--max-total-tokens", str(a.budget), "--context-length", str(a.context_length),
            "--decode-log-interval", "1"]
    graphs = ["--enable-torch-compile", "--cuda-graph-bs-decode", *map(str, sizes)]
    t0 = time.monotonic()
    runs = []
    for name, extra in (("eager", []), ("graphs", graphs)):
        plan = plan_server(parse_server(f"dms:{a.ratio}"), ServeContext(model=Path(model)), base + extra)
        runs.append(run_server(name, model, plan.args + base + extra, plan.env, prompts, a.L, logs))
    eager, graph = runs
    same = {b: sum(x == y for x, y in zip(eager["outputs"][b], graph["outputs"][b])) for b in eager["outputs"]}
    command = "python benchmarks/dms_decode_graphs.py " + " ".join(sys.argv[1:])
    payload = {"command": command, "ratio": a.ratio, "graph_bs": sizes, "prompts": a.prompts,
               "prompt_tokens": a.prompt_tokens, "L": a.L, "context_length": a.context_length,
               "budget_tokens": a.budget, "total_s": round(time.monotonic() - t0, 1),
               "greedy_equal": same, "servers": runs}
    rows = ["| server | start-up | decode step, batch of 1 | decode step, batch of "
            f"{a.prompts} | steps replayed from graphs |", "|---|---|---|---|---|"]
    for r in runs:
        rows.append(f"| {r['name']} | {r['start_s']} s | {r['steps']['1']} ms | {r['steps'][str(a.prompts)]} ms | "
                    f"{r['graph_steps']} |")
    lines = [f"# DMS {a.ratio}x decode graphs on a CPU: SGLang's graph runner against eager decode", "",
             f"`{command}`", "",
             f"Embedded SmolLM2-135M, shipped {a.ratio}x gates, {a.prompts} held-out prompts of {a.prompt_tokens} "
             f"tokens, {a.L} greedy tokens each, one at a time and then all at once (padded to the next of the "
             f"captured sizes {sizes}); context length {a.context_length} (the graph tables' width), budget "
             f"{a.budget} tokens; servers one after the other in one run. Decode step: (time for {a.L} tokens "
             f"- time for 1) / {a.L - 1}, prompts cached.", "", *rows, "",
             "Greedy outputs equal between the two servers: "
             + ", ".join(f"batch of {b}: {n}/{len(eager['outputs'][b])}" for b, n in same.items()) + "."]
    write(out, payload, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
