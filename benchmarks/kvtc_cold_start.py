"""The KVTC storage tier's cold start: the first requests after a server says it is ready, against the
same load a minute later.

One SGLang CPU server with the KVTC tier (``kvsqueeze serve --method kvtc:RATIO`` settings). As soon
as it is ready: a first round of ``--requests`` different prompts, ``--users`` at a time (what the load
harness's first configuration sends); then, on the warm server, a second round of as many new prompts.
Reported: TTFT and end-to-end latency per round (p50, p99, max), and the time from start to ready.
``--fresh`` clears the cached bit allocations first, as on a machine that never ran the tier.

    python benchmarks/kvtc_cold_start.py [--ratio 8] [--requests 12] [--users 2] [--prompt-tokens 1024]
                                         [--fresh] [--out results/kvtc/cold-start]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvsqueeze import corpus  # noqa: E402
from kvsqueeze.backends.sglang.server import SGLangServer, free_port  # noqa: E402
from kvsqueeze.backends.sglang.serving import ServeContext, parse_server, plan_server  # noqa: E402
from kvsqueeze.harness.client import Client, build_body  # noqa: E402
from kvsqueeze.model import load_hf, resolve_model  # noqa: E402


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def round_of(url: str, prompts: list[str], users: int, max_new: int) -> dict:
    def one(text):
        c = Client(url)
        try:
            res = c.stream("generate", build_body("generate", text, 1, max_new, 0.0))
        finally:
            c.close()
        s = res.samples[0] if res.samples else None
        return (s.ttft_s, s.e2e_s) if res.ok and s is not None else (None, None)

    t0 = time.monotonic()
    with ThreadPoolExecutor(users) as ex:
        got = list(ex.map(one, prompts))
    ttft = [t for t, _ in got if t is not None]
    e2e = [e for _, e in got if e is not None]
    return {"requests": len(prompts), "failed": len(prompts) - len(ttft), "wall_s": round(time.monotonic() - t0, 2),
            "ttft_p50_s": round(_pct(ttft, .5), 3), "ttft_p99_s": round(_pct(ttft, .99), 3),
            "ttft_max_s": round(max(ttft), 3), "e2e_p50_s": round(_pct(e2e, .5), 3),
            "e2e_p99_s": round(_pct(e2e, .99), 3), "ttft_s": [round(t, 3) for t in ttft]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=8.0)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--users", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--pause", type=float, default=30.0, help="idle seconds between the rounds (the first "
                    "round's pages finish going to storage)")
    ap.add_argument("--fresh", action="store_true",
                    help="clear the cached bit allocations first (a fresh machine: nothing planned yet)")
    ap.add_argument("--out", default=str(ROOT / "results" / "kvtc" / "cold-start"))
    a = ap.parse_args()
    model = resolve_model(None)
    if a.fresh:
        import shutil

        from kvsqueeze.model import home

        shutil.rmtree(home() / "kvtc" / "allocations", ignore_errors=True)
    tok, _ = load_hf(model)
    segs = corpus.token_segments(corpus.heldout_documents(), tok, a.prompt_tokens, 2 * a.requests)
    texts = [tok.decode(ids) for _, ids in segs]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ctx = ServeContext(model=model, quick_calibration=True)
    plan = plan_server(parse_server(f"kvtc:{a.ratio:g}"), ctx)
    srv = SGLangServer(model=model, port=free_port(), extra_args=plan.args, env=plan.env,
                       log_path=out.parent / f"{out.name}-server.log")
    t0 = time.monotonic()
    srv.start_and_wait(timeout=900)
    ready_s = round(time.monotonic() - t0, 1)
    try:
        first = round_of(srv.url, texts[:a.requests], a.users, a.max_new)
        time.sleep(a.pause)
        second = round_of(srv.url, texts[a.requests:], a.users, a.max_new)
    finally:
        srv.stop()
    summary = {"command": "python benchmarks/kvtc_cold_start.py " + " ".join(sys.argv[1:]),
               "ratio": a.ratio, "fresh": a.fresh, "start_to_ready_s": ready_s, "first_round": first,
               "second_round": second}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    rows = [f"| {name} | {r['requests']} | {r['failed']} | {r['ttft_p50_s']} | {r['ttft_p99_s']} | {r['ttft_max_s']} | "
            f"{r['e2e_p50_s']} | {r['e2e_p99_s']} |" for name, r in (("first (cold)", first), ("second (warm)", second))]
    out.with_suffix(".md").write_text("\n".join([
        f"# KVTC tier cold start (kvtc:{a.ratio:g})", "", f"`{summary['command']}`; start to ready {ready_s} s.", "",
        "| round | requests | failed | TTFT p50 s | TTFT p99 s | TTFT max s | E2E p50 s | E2E p99 s |",
        "|---|---|---|---|---|---|---|---|", *rows, ""]))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
