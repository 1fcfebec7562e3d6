"""The fault campaign (``kvsqueeze check-server``) against every server kind kvsqueeze starts, one after
the other: vanilla SGLang, DMS, block fusion and the KVTC storage tier, each with the same KV budget
and SGLang's strict idle check on (a leaked page stops the server, which the next check sees).

    python benchmarks/faults.py [--servers none,dms:8,fusion:0.9:token,kvtc:8] [--budget 4096]
                                [--out results/faults/campaign]

Writes ``<out>.json`` (every case of every server) and ``<out>.md`` (the table, with the command).
Target: every server survives every case (alive, no request without an answer or a status) with no
KV left once idle.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvsqueeze.backends.sglang.server import SGLangServer, free_port  # noqa: E402
from kvsqueeze.backends.sglang.serving import ServeContext, parse_server, plan_server  # noqa: E402
from kvsqueeze.harness import faults  # noqa: E402
from kvsqueeze.model import resolve_model  # noqa: E402


def write(out: Path, runs: list[dict], budget: int, wall_s: float) -> dict:
    """The campaign so far as ``<out>.json`` and ``<out>.md``."""
    command = "python benchmarks/faults.py " + " ".join(sys.argv[1:])
    summary = {"command": command, "budget_tokens": budget, "wall_s": round(wall_s, 1),
               "all_survived": all(c["ok"] for r in runs for c in r["cases"]), "runs": runs}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# Fault campaign: {', '.join(r['server'] for r in runs)}", "",
             f"`{command}` (KV budget {budget} tokens per server, SGLang's strict idle check on; "
             f"{summary['wall_s']:.0f} s). Per case: requests tried; answered (2xx), refused with a status "
             "(4xx, or 503 for a full queue), failed (5xx or no answer); streams dropped by the client on "
             "purpose; whether the server still answered `/health`; KV tokens still held once idle with its "
             "prefix cache flushed (`sglang:num_used_tokens`, DMS's `kvsqueeze_dms_held_tokens`).", "",
             f"**Every server survived every case with nothing leaked: {'yes' if summary['all_survived'] else 'no'}.**",
             ""]
    head = faults.table([]).splitlines()
    lines += head + [row for r in runs for row in faults.table(
        [faults.CaseResult(**{k: v for k, v in c.items() if k != "ok"}) for c in r["cases"]],
        r["server"]).splitlines()[2:]]
    notes = [f"- {r['server']} / {c['case']}: {'; '.join(c['notes'])}" for r in runs for c in r["cases"] if c["notes"]]
    if notes:
        lines += ["", "Notes:", ""] + notes
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", flush=True)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default="none,dms:8,fusion:0.9:token,kvtc:8")
    ap.add_argument("--budget", type=int, default=4096, help="--max-total-tokens of every server")
    ap.add_argument("--cases", default=",".join(faults.KINDS))
    ap.add_argument("--out", default=str(ROOT / "results" / "faults" / "campaign"))
    a = ap.parse_args()
    servers = [parse_server(s) for s in a.servers.split(",") if s]
    kinds = [k for k in a.cases.split(",") if k]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.parent / f"{out.name}-logs"
    logs.mkdir(exist_ok=True)
    model = resolve_model(None)
    runs, t_run = [], time.monotonic()
    for spec in servers:
        slug = spec.label.replace(":", "-").replace("+", "_")
        ctx = ServeContext(model=model, quick_calibration=True, stats_file=str(logs / f"{slug}-kvtc-stats.json"))
        plan = plan_server(spec, ctx, ["--max-total-tokens", str(a.budget)])
        srv = SGLangServer(model=model, port=free_port(), log_path=logs / f"server-{slug}.log",
                           extra_args=plan.args + ["--max-total-tokens", str(a.budget)],
                           env={**plan.env, "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"})
        print(f"[{spec.label}] starting SGLang", flush=True)
        srv.start_and_wait(timeout=600)
        t0 = time.monotonic()
        try:
            results = faults.Campaign(srv.url, budget_tokens=a.budget,
                                      log=lambda m, s=spec.label: print(f"[{s}] {m}", flush=True)).run(kinds)
        finally:
            exit_code = srv.proc.poll() if srv.proc is not None else None
            srv.stop()
        runs.append({"server": spec.label, "seconds": round(time.monotonic() - t0, 1),
                     "exited_during_campaign": exit_code, "cases": faults.to_dicts(results)})
        print(faults.table(results, spec.label), flush=True)
        summary = write(out, runs, a.budget, time.monotonic() - t_run)  # after every server: nothing lost
    print(f"campaign done in {time.monotonic() - t_run:.0f} s", flush=True)
    return 0 if summary["all_survived"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
