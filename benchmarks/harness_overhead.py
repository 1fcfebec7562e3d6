"""How fast the load harness itself is: requests/s it sustains and the latency it adds.

Runs the real path (``kvsqueeze.harness.sweep.run_config``: a headless Locust process with the
kvsqueeze locustfile and its streaming client) against the scripted stub server
(``kvsqueeze.harness.stub``, in its own process) whose timings are known:

1. throughput: stub answering at once (TTFT 0, 4 tokens, no gaps), ``--users`` users, ``--requests``
   requests; requests/s over the span from the first request sent to the last sample finished;
2. added latency: stub with TTFT 50 ms and 5 ms between 8 tokens, ``--latency-users`` users;
   measured TTFT minus 50 ms and measured end-to-end minus 85 ms, p50 and p99. This includes the
   stub's own scheduling delay, so it is an upper bound on what the harness adds.

Target: at least 50 req/s with under 5 ms added at p50.

    python benchmarks/harness_overhead.py [--requests 6000] [--users 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvsqueeze.backends.sglang.server import free_port  # noqa: E402
from kvsqueeze.harness.plan import Plan  # noqa: E402
from kvsqueeze.harness.sweep import run_config  # noqa: E402
from kvsqueeze.harness.tasks import make_questions  # noqa: E402


def start_stub(ttft: float, gap: float, tokens: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvsqueeze.harness.stub", "--port", str(port),
                             "--ttft", str(ttft), "--gap", str(gap), "--tokens", str(tokens)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("stub did not start")


def one_run(ttft, gap, tokens, users, requests, label, workdir):
    proc, url = start_stub(ttft, gap, tokens)
    try:
        per_task = -(-requests // 3)
        qs = make_questions(["passkey", "lookup", "arithmetic"], per_task)[:requests]
        plan = Plan(url=url, W=1, L=tokens, questions=[q.to_dict() for q in qs], users=users,
                    run="harness-overhead", method="stub", config=label)
        res = run_config(plan, Path(workdir) / label, max_time=300, log=lambda m: None)
    finally:
        proc.kill()
    df = pd.read_csv(Path(workdir) / label / "requests.csv")
    ok = df[df["ok"] == 1]
    span = (ok["start_unix"] + ok["e2e_s"]).max() - ok["start_unix"].min()
    return res, ok, span


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--latency-requests", type=int, default=600)
    ap.add_argument("--latency-users", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "results" / "harness"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        res1, ok1, span1 = one_run(0.0, 0.0, 4, a.users, a.requests, "throughput", tmp)
        rps = len(ok1) / span1
        print(f"throughput: {len(ok1)}/{a.requests} requests ok in {span1:.2f} s with {a.users} "
              f"users: {rps:.0f} req/s", flush=True)
        res2, ok2, _ = one_run(0.05, 0.005, 8, a.latency_users, a.latency_requests, "latency", tmp)
        add_ttft = (ok2["ttft_s"] - 0.05) * 1000
        add_e2e = (ok2["e2e_s"] - (0.05 + 7 * 0.005)) * 1000
        gaps = [g for s in ok2["gaps_s"] for g in json.loads(s)]
        gap_err = (pd.Series(gaps) - 0.005).abs() * 1000
    fig = {
        "machine": f"{os.cpu_count()} cores", "python": sys.version.split()[0],
        "throughput": {"users": a.users, "requests": a.requests, "ok": int(len(ok1)),
                       "span_s": round(float(span1), 3), "req_per_s": round(float(rps), 1),
                       "status": res1.status},
        "added_latency_ms": {
            "users": a.latency_users, "requests": a.latency_requests, "ok": int(len(ok2)),
            "ttft_p50": round(float(add_ttft.quantile(.5)), 2), "ttft_p99": round(float(add_ttft.quantile(.99)), 2),
            "e2e_p50": round(float(add_e2e.quantile(.5)), 2), "e2e_p99": round(float(add_e2e.quantile(.99)), 2),
            "gap_abs_error_p50": round(float(gap_err.quantile(.5)), 2),
            "gap_abs_error_p99": round(float(gap_err.quantile(.99)), 2), "status": res2.status},
        "target": "at least 50 req/s; under 5 ms added at p50",
        "command": "python benchmarks/harness_overhead.py " + " ".join(sys.argv[1:]),
    }
    lat = fig["added_latency_ms"]
    print(f"added latency (stub TTFT 50 ms, 8 tokens 5 ms apart, {a.latency_users} users): TTFT "
          f"+{lat['ttft_p50']} ms p50 / +{lat['ttft_p99']} ms p99; end-to-end +{lat['e2e_p50']} ms "
          f"p50 / +{lat['e2e_p99']} ms p99; chunk-gap error {lat['gap_abs_error_p50']} ms p50")
    ok = bool(fig["throughput"]["req_per_s"] >= 50 and lat["ttft_p50"] < 5)
    print(f"target (>= 50 req/s, < 5 ms at p50): {'met' if ok else 'NOT met'}")
    fig["target_met"] = ok
    (out / "overhead.json").write_text(json.dumps(fig, indent=1))
    (out / "overhead.md").write_text(
        "# Harness overhead against the scripted stub\n\n"
        f"`{fig['command']}` ({fig['machine']}, stub and Locust on the same machine)\n\n"
        "| figure | value |\n|---|---|\n"
        f"| sustained requests/s ({a.users} users, stub answers at once, 4 tokens) | "
        f"{fig['throughput']['req_per_s']} |\n"
        f"| TTFT added p50 / p99 (ms) | {lat['ttft_p50']} / {lat['ttft_p99']} |\n"
        f"| end-to-end added p50 / p99 (ms) | {lat['e2e_p50']} / {lat['e2e_p99']} |\n"
        f"| chunk-gap error p50 / p99 (ms) | {lat['gap_abs_error_p50']} / "
        f"{lat['gap_abs_error_p99']} |\n\n"
        f"Target: {fig['target']}: **{'met' if ok else 'not met'}**. Added latency includes the "
        "stub's own scheduling delay (an upper bound on the harness's).\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
