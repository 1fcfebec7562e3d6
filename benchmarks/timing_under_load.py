"""The timing tests under load: every test marked ``timing`` run again and again while one CPU-bound
process per core keeps the machine busy, as a shared CI machine may be.

A timing test compares the harness's measured times with a server's own records (the stub writes down
when it got each request and wrote each chunk); this checks that such tests measure the harness, not
the machine: they must pass every time with every core taken.

    python benchmarks/timing_under_load.py [--runs 20] [--busy N] [--out results/ci/timing-under-load]

Prints each run's outcome and writes ``OUT.md`` / ``OUT.json`` (the command, runs, passes, failures
with their last lines, the load). Exit code 1 if any run failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _results  # noqa: E402

BUSY_LOOP = "while True:\n    pass\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20, help="repetitions of the timing tests")
    p.add_argument("--busy", type=int, default=os.cpu_count() or 2,
                   help="CPU-bound processes kept running meanwhile (default: one per core)")
    p.add_argument("--marker", default="timing", help="pytest marker of the tests to repeat")
    p.add_argument("--out", default="results/ci/timing-under-load")
    a = p.parse_args(argv)
    if a.runs < 1:
        p.error(f"runs={a.runs}: expected at least one repetition")
    if a.busy < 0:
        p.error(f"busy={a.busy}: expected a number of processes >= 0")
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(a.busy)]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", a.marker, "tests"]
    runs = []
    try:
        time.sleep(1.0)  # the loops are running before the first test starts
        for i in range(a.runs):
            t0 = time.monotonic()
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            tail = (out.stdout + out.stderr).strip().splitlines()
            summary = next((ln for ln in reversed(tail) if " passed" in ln or " failed" in ln
                            or " error" in ln), tail[-1] if tail else "")
            runs.append({"run": i + 1, "rc": out.returncode, "seconds": round(time.monotonic() - t0, 1),
                         "summary": summary.strip("= "),
                         "failure": "\n".join(tail[-25:]) if out.returncode else ""})
            print(f"run {i + 1}/{a.runs}: {'pass' if out.returncode == 0 else 'FAIL'} "
                  f"({runs[-1]['summary']}, {runs[-1]['seconds']:.0f} s)", flush=True)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    passed = sum(r["rc"] == 0 for r in runs)
    command = "python " + " ".join([str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:]))
    lines = [f"# Timing tests under load ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `{command}`", "",
             f"`pytest -m {a.marker}` run {a.runs} times in a row while {a.busy} CPU-bound processes "
             f"(`while True: pass`) kept this machine's {os.cpu_count()} cores busy.", "",
             f"**{passed}/{a.runs} runs passed.**", "",
             "| run | result | seconds |", "|---|---|---|"]
    lines += [f"| {r['run']} | {r['summary']} | {r['seconds']} |" for r in runs]
    for r in runs:
        if r["rc"]:
            lines += ["", f"## Run {r['run']} failed", "", "```", r["failure"], "```"]
    _results.write(a.out, {"command": command, "runs": a.runs, "passed": passed, "busy": a.busy,
                           "cores": os.cpu_count(), "marker": a.marker, "results": runs}, lines)
    print(f"{passed}/{a.runs} runs passed")
    return 0 if passed == a.runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
