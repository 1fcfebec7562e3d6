"""The command line of load campaigns: ``kvsqueeze campaign`` and ``kvsqueeze soak`` (and their checks
of every argument before anything starts). ``kvsqueeze.cli`` registers them."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kvsqueeze.errors import bad_value


def add_parsers(sub) -> None:
    from kvsqueeze.backends.sglang.serving import DEFAULT_SERVERS
    from kvsqueeze.harness.arrivals import KINDS

    c = sub.add_parser("campaign", help="load campaign: workloads x loads x methods, open or closed loop, "
                                        "SLO goodput and capacity search, with a report (arguments after -- "
                                        "go to SGLang)")
    c.add_argument("--workload", action="append", default=None, metavar="NAME[:KEY=VALUE,...]",
                   help="traffic (repeatable): sharegpt, sharegpt-multiturn, shared-prefix, random, jsonl, "
                        "questions, with options (e.g. sharegpt:max_output=128, sharegpt-multiturn:think=2, "
                        "random:input=128..512,output=64, jsonl:path=FILE); default sharegpt")
    c.add_argument("--methods", default=None,
                   help="servers, comma-separated, each METHOD[:SETTING[:VARIANT]] or several joined by + "
                        "(default " + ",".join(DEFAULT_SERVERS) + ")")
    c.add_argument("--load", default="poisson",
                   help=f"arrivals: one of {', '.join(KINDS)} (open loop at a rate, or closed loop at a "
                        "concurrency); KIND:VALUE[:BURSTINESS] for one point (poisson:2, gamma:2:0.5, closed:8)")
    c.add_argument("--burstiness", type=float, default=None,
                   help="gamma arrivals' shape: 1 is Poisson, below 1 burstier (vLLM's --burstiness)")
    c.add_argument("--rates", default=None, help="open loop: request rates of the points, requests/s (1,2,4)")
    c.add_argument("--concurrency", default=None, help="closed loop: concurrencies of the points (1,4,8)")
    c.add_argument("--slo", default=None, help="latency bounds a request must meet: ttft=2s,tpot=150ms[,e2e=20s]")
    c.add_argument("--attainment", type=float, default=0.95,
                   help="share of requests that must meet the SLO for a point to pass (default 0.95)")
    c.add_argument("--search", action="store_true",
                   help="find each method's capacity at the SLO: doubling from --search-start, then bisection")
    c.add_argument("--search-start", type=float, default=None,
                   help="the search's first load (default 1 request/s, or 1 client)")
    c.add_argument("--tolerance", type=float, default=0.1, help="the search stops when its bracket is this "
                                                                 "narrow, relative (default 0.1)")
    c.add_argument("--max-points", type=int, default=8, help="points a search runs at most (default 8)")
    c.add_argument("--duration", type=float, default=None, help="seconds per point (default 60)")
    c.add_argument("--requests", type=int, default=None,
                   help="requests (conversations, for multi-turn) per point, instead of a duration")
    c.add_argument("--warmup", default="10%", help="left out of the figures: seconds (5, 5s) or a share of "
                                                   "the point (default 10%%)")
    c.add_argument("--max-time", type=float, default=None,
                   help="seconds a point may run at most (default twice its length + 120)")
    c.add_argument("--url", default=None, help="target this running server instead of starting one "
                                               "(SGLang, vLLM, trtllm-serve: any with the endpoint)")
    c.add_argument("--endpoint", default="generate", help="generate (SGLang's native), completions or chat "
                                                          "(OpenAI)")
    c.add_argument("--model", default=None, help="a local Hugging Face checkpoint (default: embedded); its "
                                                 "tokenizer sizes the requests and formats chat messages")
    c.add_argument("--budget", type=int, default=8192, help="KV tokens of every server started "
                                                           "(--max-total-tokens; 0: SGLang's own)")
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--no-ignore-eos", action="store_true",
                   help="let replies end at the model's end of sequence (default: every reply takes its max "
                        "tokens, as SGLang's and vLLM's benchmark clients do)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--calibration", default=None, help="KVTC calibration for kvtc methods")
    c.add_argument("--no-flush", action="store_true", help="keep the device prefix cache between points")
    c.add_argument("--out", default=None, help="campaign folder (default results/campaign-<time>)")
    c.add_argument("--resume", default=None, metavar="FOLDER",
                   help="continue the campaign in FOLDER: its complete points are kept")
    c.add_argument("--redo", default=None, metavar="METHODS",
                   help="with --resume: these methods' points run again, complete or not (the others are kept)")
    c.add_argument("--scrape-interval", type=float, default=2.0,
                   help="seconds between /metrics polls during a point (default 2; 0: before and after only)")

    k = sub.add_parser("soak", help="hold one server at a steady share of its capacity for a long time: "
                                    "latency drift, memory growth, KV held once idle (arguments after -- go "
                                    "to SGLang)")
    k.add_argument("--method", default="none", help="the server's method spelling (default none)")
    k.add_argument("--workload", default="sharegpt", metavar="NAME[:KEY=VALUE,...]", help="as in campaign")
    k.add_argument("--rate", type=float, default=None, help="requests (conversations) per second, Poisson")
    k.add_argument("--capacity-from", default=None, metavar="CAMPAIGN",
                   help="a campaign folder holding this method's capacity on this workload")
    k.add_argument("--fraction", type=float, default=0.7, help="share of that capacity to hold (default 0.7)")
    k.add_argument("--minutes", type=float, default=20.0)
    k.add_argument("--windows", type=int, default=10, help="windows the soak is cut into (default 10)")
    k.add_argument("--slo", default=None, help="as in campaign: attainment per window")
    k.add_argument("--url", default=None, help="a running server instead of starting one")
    k.add_argument("--server-pid", type=int, default=None, help="with --url: its process, for its memory")
    k.add_argument("--endpoint", default="generate")
    k.add_argument("--model", default=None)
    k.add_argument("--budget", type=int, default=8192)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--calibration", default=None)
    k.add_argument("--out", default=None, help="folder (default results/soak-<method>-<time>)")


def spec_from_args(args, extra: list[str]):
    """Every argument checked (errors name the field, the value and what was expected)."""
    from kvsqueeze.harness.arrivals import LoadShape, parse_load, parse_values
    from kvsqueeze.harness.campaign import CampaignSpec
    from kvsqueeze.harness.slo import parse_slo
    from kvsqueeze.harness.sweep import parse_methods
    from kvsqueeze.harness.workloads import parse_workload

    shape, one = parse_load(args.load)
    if args.burstiness is not None:
        if shape.kind != "gamma":
            raise bad_value("burstiness", args.burstiness, "only with --load gamma")
        shape = LoadShape("gamma", args.burstiness)
    field = "rates" if shape.open_loop else "concurrency"
    other = "concurrency" if shape.open_loop else "rates"
    if getattr(args, other):
        raise bad_value(other, getattr(args, other), f"--{field} with --load {shape.kind}")
    given = getattr(args, field)
    if one is not None and given:
        raise bad_value(field, given, f"no --{field} with a value in --load ({args.load})")
    values = parse_values(given, shape, field) if given else ([one] if one is not None else [])
    slo = parse_slo(args.slo, args.attainment) if args.slo else None
    if args.duration is not None and args.requests is not None:
        raise bad_value("requests", args.requests, "either --duration or --requests, not both")
    if args.resume and args.out:
        raise bad_value("out", args.out, "no --out with --resume (the campaign continues in its own folder)")
    out = Path(args.resume or args.out or Path("results") / time.strftime("campaign-%Y%m%d-%H%M%S"))
    return CampaignSpec(
        methods=parse_methods(args.methods), workloads=[parse_workload(w) for w in (args.workload or ["sharegpt"])],
        shape=shape, out_dir=out, values=values, slo=slo, search=args.search,
        search_start=args.search_start if args.search_start is not None else 1.0,
        tolerance=args.tolerance, max_points=args.max_points,
        duration_s=None if args.requests is not None else (args.duration if args.duration is not None else 60.0),
        requests=args.requests, warmup=args.warmup, max_time_s=args.max_time, url=args.url, model=args.model,
        endpoint=args.endpoint, budget_tokens=args.budget or None, seed=args.seed, temperature=args.temperature,
        ignore_eos=not args.no_ignore_eos, calibration=args.calibration, server_args=extra,
        flush_between=not args.no_flush, resume=bool(args.resume), scrape_interval=args.scrape_interval or None,
        redo=[m.strip() for m in (args.redo or "").split(",") if m.strip()])


def cmd_campaign(args, extra: list[str]) -> int:
    from kvsqueeze.harness.campaign import Campaign

    spec = spec_from_args(args, extra)
    what = "capacity search" if spec.search else f"{len(spec.values)} point(s)"
    print(f"kvsqueeze campaign: {len(spec.methods)} method(s) x {len(spec.workloads)} workload(s), {what} each, "
          f"{spec.shape.label}; KV budget {spec.budget_tokens or 'server default'} tokens; writing {spec.out_dir}",
          file=sys.stderr, flush=True)
    out = Campaign(spec, log=lambda m: print(m, file=sys.stderr, flush=True)).run()
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.md'}")
    return 0


def cmd_soak(args, extra: list[str]) -> int:
    from kvsqueeze.harness.slo import parse_slo
    from kvsqueeze.harness.soak import SoakSpec, run_soak
    from kvsqueeze.harness.sweep import parse_methods
    from kvsqueeze.harness.workloads import parse_workload

    methods = parse_methods(args.method)
    if len(methods) != 1:
        raise bad_value("method", args.method, "one server's method spelling")
    if args.endpoint not in ("generate", "completions", "chat"):
        raise bad_value("endpoint", args.endpoint, "one of generate, completions, chat")
    out = Path(args.out or Path("results") / time.strftime(f"soak-{methods[0].label.replace(':', '')}-%Y%m%d-%H%M%S"))
    spec = SoakSpec(method=methods[0], workload=parse_workload(args.workload), out_dir=out, rate=args.rate,
                    capacity_from=args.capacity_from, fraction=args.fraction, minutes=args.minutes,
                    windows=args.windows, slo=parse_slo(args.slo) if args.slo else None, url=args.url,
                    server_pid=args.server_pid, model=args.model, endpoint=args.endpoint,
                    budget_tokens=args.budget or None, seed=args.seed, server_args=extra,
                    calibration=args.calibration)
    folder = run_soak(spec, log=lambda m: print(m, file=sys.stderr, flush=True))
    print((folder / "report.md").read_text())
    print(f"report: {folder / 'report.md'}")
    return 0
