"""The ``kvsqueeze`` command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.methods.base import create_spec, get, parse_spec
from kvsqueeze.methods.fusion.config import (
    DEFAULT_BLOCK,
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_GROUPING,
    DEFAULT_SCOPE,
    DEFAULT_SIMILARITY,
    DEFAULT_THRESHOLD,
    DEFAULT_WINDOW_CHUNKS,
    GROUPINGS,
    SCOPES,
    check_similarity,
    check_threshold,
)

ENGINES = ("sglang",)


def _progress(label: str):
    t0 = time.monotonic()

    def show(i: int, n: int) -> None:
        el = time.monotonic() - t0
        eta = el / i * (n - i) if i else 0.0
        end = "\n" if i == n else ""
        print(f"\r{label}: {i}/{n}  {el:5.0f}s elapsed, ~{eta:4.0f}s left", end=end,
              file=sys.stderr, flush=True)

    return show


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def cmd_methods(args) -> int:
    from kvsqueeze.methods import available

    for name, cls in available().items():
        fixed = f" (fixed {cls.fixed_ratio:g}x)" if cls.fixed_ratio is not None else ""
        print(f"{name:10s} {cls.summary}{fixed}")
    return 0


def cmd_model(args) -> int:
    from kvsqueeze.model import resolve_model

    print(resolve_model(args.model))
    return 0


def _format_kl_table(records) -> str:
    head = (f"{'method':10s} {'target':>6s} {'achieved':>8s} {'KL mean':>9s} {'± SE':>8s} "
            f"{'top-1':>6s} {'PPL Δ%':>7s} {'held':>6s}")
    rows = [head, "-" * len(head)]
    for r in records:
        details = getattr(r, "details", None) or {}
        label = f"{r.method}@{details['threshold']:g}" if "threshold" in details else r.method
        rows.append(f"{label:10s} {r.ratio_target:6.2f} {r.ratio_achieved:8.2f} {r.kl_mean:9.4f} "
                    f"{r.kl_se:8.4f} {r.top1:6.3f} {r.ppl_delta_pct:7.2f} "
                    f"{r.tokens_held_fraction:6.3f}")
    return "\n".join(rows)


def _format_paired(records, baseline: str) -> str:
    """KL of each method minus the baseline's at the same target ratio, paired over segments."""
    from kvsqueeze.evaluate import paired_difference

    base = {r.ratio_target: r for r in records if r.method == baseline}
    rows = [f"paired against {baseline} (same segments): ΔKL = KL(method) - KL({baseline})"]
    for r in records:
        b = base.get(r.ratio_target)
        if r.method == baseline or b is None:
            continue
        diff, se = paired_difference(r, b)
        rows.append(f"  {r.method:10s} {r.ratio_target:5.2f}x  ΔKL {diff:+.4f} ± {se:.4f}"
                    f"  ({abs(diff) / se if se > 0 else float('inf'):.1f} SE)")
    if len(rows) == 1:
        rows.append(f"  no other method shares a target ratio with {baseline}")
    return "\n".join(rows)


def _format_passkey_table(records) -> str:
    head = f"{'method':10s} {'target':>6s} {'achieved':>8s} {'accuracy':>8s} {'trials':>6s}"
    rows = [head, "-" * len(head)]
    for r in records:
        details = getattr(r, "details", None) or {}
        label = f"{r.method}@{details['threshold']:g}" if "threshold" in details else r.method
        rows.append(f"{label:10s} {r.ratio_target:6.2f} {r.ratio_achieved:8.2f} "
                    f"{r.accuracy:8.3f} {r.trials:6d}")
    return "\n".join(rows)


FUSION_FLAG_DEFAULTS = {"grouping": DEFAULT_GROUPING, "scope": DEFAULT_SCOPE,
                        "chunk_tokens": DEFAULT_CHUNK_TOKENS, "window_chunks": DEFAULT_WINDOW_CHUNKS}


def cmd_eval(args) -> int:
    from kvsqueeze import corpus, evaluate
    from kvsqueeze.model import load_hf, resolve_model

    specs = _split(args.method)
    names = [get(parse_spec(s).name).name for s in specs]
    ratios = evaluate.parse_ratios(args.ratio)
    options = {"sinks": args.sinks, "recent": args.recent}
    per_method = {"dms": {"checkpoint": args.checkpoint}} if args.checkpoint else {}
    if args.checkpoint and "dms" not in names:
        raise bad_value("checkpoint", args.checkpoint, "to be used with --method dms")
    if args.dms_scored is not None:
        if "dms" not in names:
            raise bad_value("dms-scored", args.dms_scored, "to be used with --method dms")
        per_method.setdefault("dms", {})["scored"] = args.dms_scored
    if args.calibration:
        if "kvtc" not in names:
            raise bad_value("calibration", args.calibration, "to be used with --method kvtc")
        per_method["kvtc"] = {"calibration": args.calibration}
    if "fusion" in names:
        per_method["fusion"] = {"block_size": args.block_size, "grouping": args.grouping,
                                "scope": args.scope, "chunk_tokens": args.chunk_tokens,
                                "window_chunks": args.window_chunks}
    else:
        for flag in ("grouping", "scope", "chunk_tokens", "window_chunks"):
            if getattr(args, flag) != FUSION_FLAG_DEFAULTS[flag]:
                raise bad_value(flag.replace("_", "-"), getattr(args, flag), "to be used with --method fusion")
    specs = _fusion_specs(specs, names, args)
    if args.workload is not None:
        return _eval_fusion_workload(args, specs)
    for flag in ("shared_pages", "online"):
        if getattr(args, flag):
            raise bad_value(flag.replace("_", "-"), True, "to be used with --workload")
    methods = evaluate.build_methods(specs, ratios, per_method, **options)
    if args.task == "kl":  # before the model loads: a prefix a method cannot take is refused at once
        for m in methods:
            m.validate_prefix(args.prefix_tokens)
    if args.json:  # fail before the long run, not after it
        out = Path(args.json)
        if out.parent and not out.parent.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
    docs = corpus.read_text_files(args.text) if args.text else corpus.heldout_documents()
    model_arg = args.model
    if model_arg is None:  # a DMS checkpoint (not the shipped gates) is a Hugging Face model directory too
        model_arg = next((str(m.checkpoint) for m in methods if m.name == "dms"
                          and (Path(m.checkpoint) / "config.json").is_file()), None)
    model_path = resolve_model(model_arg)
    tok, model = load_hf(model_path)
    model_name = model_path.name
    print(f"model {model_path}  methods {', '.join(m.describe() for m in methods)}", file=sys.stderr)
    if args.task == "passkey":
        records = evaluate.evaluate_passkey(model, tok, methods, args.trials, args.context_tokens,
                                            model_name, progress=_progress("passkey trials"))
        print(_format_passkey_table(records))
    else:
        evaluate.check_lengths(model, args.prefix_tokens, args.scored_tokens)
        segs = corpus.token_segments(docs, tok, args.prefix_tokens + args.scored_tokens + 1,
                                     args.segments, what="--text file" if args.text else "held-out text")
        print(f"{len(segs)} segments of {args.prefix_tokens}+{args.scored_tokens} tokens from "
              f"{len({s for s, _ in segs})} source(s)", file=sys.stderr)
        records = evaluate.evaluate_kl(model, [s for _, s in segs], methods, args.prefix_tokens,
                                       args.scored_tokens, model_name,
                                       progress=_progress("segments"))
        print(_format_kl_table(records))
        for r in records:
            if "ratio_compressed" in r.details:
                print(f"{r.method} {r.ratio_target:g}x: ratio over the compressed tokens "
                      f"{r.details['ratio_compressed']:.2f}x (every blob byte vs 16-bit K+V of those tokens)")
        if args.paired_against:
            print(_format_paired(records, args.paired_against))
        print(f"ratio: {methods[0].ratio_unit if len({m.ratio_unit for m in methods}) == 1 else 'per method, see JSON'}; "
              "KL = mean KL(dense || method) of next-token distributions, ± SE over segments")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in records], indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _eval_fusion_workload(args, specs: list[str]) -> int:
    """``eval --method fusion --workload KINDS``: fusion across the requests of near-duplicate traffic."""
    from kvsqueeze import evaluate
    from kvsqueeze.model import load_hf, resolve_model
    from kvsqueeze.workload import KINDS

    parsed = [parse_spec(s) for s in specs]
    if any(get(p.name).name != "fusion" for p in parsed):
        raise bad_value("workload", args.workload, "to be used with --method fusion alone")
    settings = [get("fusion").spec_options(p.setting or str(DEFAULT_THRESHOLD), p.variant or DEFAULT_SIMILARITY)
                for p in parsed]
    thresholds = list(dict.fromkeys(check_threshold(s["threshold"]) for s in settings))
    sims = list(dict.fromkeys(check_similarity(s["similarity"]) for s in settings))  # before the model loads
    if args.requests < 2:
        raise bad_value("requests", args.requests, "at least 2 requests per kind")
    kinds = _split([args.workload])
    for k in kinds:
        if k not in KINDS:
            raise bad_value("workload", k, f"one of {', '.join(KINDS)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    tok, model = load_hf(resolve_model(args.model))
    bars = {}

    def progress(what, i, n):
        if n:
            bars.setdefault(what, _progress(what))(i, n)

    recs = evaluate.evaluate_batch_fusion(model, tok, kinds, thresholds, sims,
                                          per_group=args.requests, block_size=args.block_size,
                                          shared_pages=args.shared_pages or args.online,
                                          online=args.online, grouping=args.grouping,
                                          progress=progress)
    head = (f"{'workload':9s} {'sim':6s} {'thresh':>6s} {'radix':>6s} {'fused':>7s} "
            f"{'fewer':>6s} {'KL mean':>8s} {'KL max':>8s} {'top-1':>6s}")
    print(head + "\n" + "-" * len(head))
    for r in recs:
        print(f"{r.kind:9s} {r.similarity:6s} {r.threshold:6.3g} {r.pages_radix:6d} "
              f"{r.pages_fused:7.1f} {r.fewer_than_radix:5.2f}x {r.kl_mean:8.4f} {r.kl_max:8.4f} "
              f"{r.top1:6.3f}")
    print("pages: 16-token pages held by the batch with exact prefix sharing (radix) and with radix "
          "+ fusion (averaged over layers); KL = mean over requests of KL(dense || fused)")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in recs], indent=1) + "\n")
    return 0


def _thresholds(text: str | None) -> list[float] | None:
    if text is None:
        return None
    out = []
    for part in str(text).split(","):
        try:
            out.append(check_threshold(float(part)))
        except ValueError:
            raise bad_value("threshold", part, "a cosine similarity in (0, 1], or a list such as 0.7,0.9")
    return out


def _fusion_specs(specs: list[str], names: list[str], args) -> list[str]:
    """``--method fusion`` with ``--threshold T1,T2`` and ``--similarity S1,S2``: one spec per pair
    (``fusion:T:S``), the same methods ``--method fusion:T1:S1,fusion:T2:S1,...`` names."""
    thresholds = _thresholds(args.threshold)
    sims = [check_similarity(s) for s in _split([args.similarity])] if args.similarity else None
    if thresholds is None and sims is None:
        return specs
    if "fusion" not in names:
        flag = "threshold" if thresholds is not None else "similarity"
        raise bad_value(flag, args.threshold if thresholds is not None else args.similarity,
                        "to be used with --method fusion")
    out = []
    for text, name in zip(specs, names):
        spec = parse_spec(text)
        if name != "fusion":
            out.append(text)
            continue
        if spec.setting is not None:
            raise bad_value("method", text, "fusion without a setting when --threshold or --similarity "
                            "is given (or fusion:T:S alone)")
        out += [f"fusion:{t:g}:{s}" for s in (sims or [DEFAULT_SIMILARITY])
                for t in (thresholds or [DEFAULT_THRESHOLD])]
    return out


RETIRED_SERVE_FLAGS = {  # flags of earlier releases, now part of the method's spelling
    "--ratio": "--method dms:4 (the shipped gates) or --method dms:DIR",
    "--checkpoint": "--method dms:DIR",
    "--threshold": "--method fusion:0.9",
    "--similarity": "--method fusion:0.9:token",
    "--kv-store": "--method kvtc:8 (--store-dir DIR for a directory)",
    "--kv-store-ratio": "--method kvtc:RATIO",
    "--block-size": "SGLang's --page-size (fusion shares whole pages: a block is a page)",
}


def cmd_serve(args, extra: list[str]) -> int:
    from kvsqueeze.backends.sglang import serving
    from kvsqueeze.backends.sglang.server import SGLangServer, free_port
    from kvsqueeze.model import resolve_model

    if args.engine not in ENGINES:
        raise bad_value("engine", args.engine, f"one of {', '.join(ENGINES)} (TensorRT-LLM: see docs)")
    for flag, instead in RETIRED_SERVE_FLAGS.items():
        if serving.has_flag(extra, flag):
            raise bad_value(flag.lstrip("-"), "given", f"the method's spelling instead: {instead}")
    server_spec = serving.parse_server(args.method or "none")
    names = server_spec.names
    for flag, value, method in (("fusion-layers", args.fusion_layers, "fusion"),
                                ("store-dir", args.store_dir, "kvtc"), ("calibration", args.calibration, "kvtc")):
        if value is not None and method not in names:
            raise bad_value(flag, value, f"to be used with --method {method}")
    if not (0 <= args.port <= 65535):
        raise bad_value("port", args.port, "a TCP port between 0 and 65535")
    model_path = resolve_model(args.model)
    ctx = serving.ServeContext(model=model_path, calibration=args.calibration, store_dir=args.store_dir,
                               fusion_layers=args.fusion_layers)
    plan = serving.plan_server(server_spec, ctx, extra)
    for note in plan.notes:
        print(note, file=sys.stderr)
    port = args.port or free_port(args.host)
    server = SGLangServer(model=model_path, host=args.host, port=port, extra_args=plan.args + extra,
                          env=plan.env)
    print(f"starting SGLang ({server_spec.label}: {server_spec.summary}): {' '.join(server.command())}",
          file=sys.stderr, flush=True)
    server.start()

    def _stop(signum, frame):
        raise KeyboardInterrupt

    # Explicit handlers: a process started in the background by a shell inherits SIGINT ignored.
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.wait_ready(timeout=args.start_timeout)
        print(f"SGLang server ready at {server.url}  (Ctrl-C stops it)", flush=True)
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(0.5)
        code = server.proc.returncode if server.proc is not None else 0
        print(f"SGLang server exited with code {code}", file=sys.stderr)
        return code or 1
    except KeyboardInterrupt:
        print("\nstopping SGLang server ...", file=sys.stderr, flush=True)
        return 0
    finally:
        server.stop()


def cmd_dms_offset(args) -> int:
    import torch

    from kvsqueeze import corpus
    from kvsqueeze.methods.dms.offset import calibrate_offset, save_with_offset
    from kvsqueeze.model import load_hf, resolve_model

    spec = parse_spec(args.method)
    if spec.name != "dms":
        raise bad_value("method", args.method, "dms:RATIO (shipped gates) or dms:DIR")
    method = create_spec(spec)
    if args.segments < 1:
        raise bad_value("segments", args.segments, "at least 1 segment")
    target = method.ratio if args.target is None else args.target
    if not target > 1:
        raise bad_value("target", target, "a ratio > 1")
    method.validate_prefix(args.prefix_tokens)
    docs = corpus.read_text_files(args.text)
    tok, model = load_hf(resolve_model(args.model))
    segs = [torch.tensor(ids) for _, ids in corpus.token_segments(docs, tok, args.prefix_tokens,
                                                                  args.segments, what="--text file")]
    print(f"fitting {method.describe()} to {target:g}x on {len(segs)} segments of {args.prefix_tokens} "
          "tokens", file=sys.stderr)
    fit = calibrate_offset(model, method, segs, target, log=lambda m: print(m, file=sys.stderr, flush=True))
    out = save_with_offset(method, fit["offset"], target, args.out, fit)
    print(f"offset {fit['offset']:+.3f}: ratio {fit['ratio_before']:.2f}x -> {fit['ratio']:.2f}x on this "
          f"text; checkpoint {out} (use --method dms:{out})")
    return 0


def cmd_dms_train(args) -> int:
    from kvsqueeze.methods.dms.train import TrainConfig, train
    from kvsqueeze.model import resolve_model

    cfg = TrainConfig(target_ratio=args.target_ratio, steps=args.steps, ramp_steps=args.ramp_steps,
                      seq_len=args.seq_len, batch=args.batch, lr=args.lr, mode=args.mode,
                      window=args.window, sinks=args.sinks, forward=args.forward, gate=args.gate, granularity=args.granularity,
                      seed=args.seed, save_every=args.save_every, threads=args.threads,
                      precision=args.precision, lr_decay=args.lr_decay, init=args.init,
                      init_sequences=args.init_sequences, teacher=args.teacher,
                      compression_loss=args.compression_loss)
    if args.device != "cpu":
        import torch

        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            raise bad_value("device", args.device, "cpu, or cuda[:N] on a machine with a CUDA GPU")
    summary = train(resolve_model(args.model), Path(args.out), cfg, device=args.device)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
    return 0


def cmd_kvtc_calibrate(args) -> int:
    from kvsqueeze import corpus
    from kvsqueeze.methods.kvtc import calibrate as kvtc
    from kvsqueeze.model import load_hf, resolve_model

    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise bad_value("out", args.out, "a file path for the calibration (not a directory)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    docs = corpus.read_text_files(args.text) if args.text else corpus.calibration_documents()
    model_path = resolve_model(args.model)
    tok, model = load_hf(model_path)
    t0 = time.monotonic()
    bars = {}

    def progress(i, n, what):
        if what not in bars:
            bars[what] = _progress(f"kvtc calibrate ({what})")
        bars[what](i, n)

    cal = kvtc.calibrate(model, tok, docs, seq_len=args.seq_len, segments=args.segments,
                         grouping=args.grouping, tune=not args.no_tune, progress=progress)
    cal.info["model_path"] = str(model_path)
    cal.info["seconds"] = round(time.monotonic() - t0, 1)
    cal.save(out)
    print(f"wrote {out} (calibration {cal.fingerprint()}, model {cal.model_fingerprint}, "
          f"key share {cal.key_share}, {cal.info['seconds']:.0f} s)")
    return 0


def cmd_bench(args, extra: list[str]) -> int:
    from kvsqueeze.harness import sweep
    from kvsqueeze.harness.tasks import parse_tasks

    grid = sweep.parse_grid(args.grid)
    methods = sweep.parse_methods(args.methods)
    tasks = parse_tasks(args.tasks)
    if args.questions < 1:
        raise bad_value("questions", args.questions, "a number of questions per task >= 1")
    if not 0 <= args.temperature <= 2:
        raise bad_value("temperature", args.temperature, "a sampling temperature in [0, 2]")
    if args.resume and args.out:
        raise bad_value("out", args.out, "no --out with --resume (the run continues in its own directory)")
    if args.pilot < 1:
        raise bad_value("pilot", args.pilot, "a number of pilot questions >= 1")
    if args.fill_max < 0:
        raise bad_value("fill-max", args.fill_max, "a number of questions >= 0 (0: the batch is not filled)")
    redo = [m.strip() for m in (args.redo or "").split(",") if m.strip()]
    if redo and not args.resume:
        raise bad_value("redo", args.redo, "methods of a run continued with --resume")
    unknown = [m for m in redo if m not in [x.label for x in methods]]
    if unknown:
        raise bad_value("redo", ",".join(unknown), f"methods of the run ({', '.join(x.label for x in methods)})")
    out = Path(args.resume or args.out or Path("results") / time.strftime("bench-%Y%m%d-%H%M%S"))
    spec = sweep.BenchSpec(methods=methods, grid=grid, out_dir=out, url=args.url, model=args.model,
                           tasks=tasks, questions_per_task=args.questions, users=args.users,
                           temperature=args.temperature, max_time=args.max_time, seed=args.seed,
                           calibration=args.calibration, flush_between=not args.no_flush,
                           server_args=extra, budget_tokens=args.budget or None, pilot=args.pilot,
                           resume=bool(args.resume), redo=redo, fill_max=args.fill_max)
    n = len(methods) * len(spec.configs())
    print(f"kvsqueeze bench: {len(methods)} method(s) x {len(spec.configs())} configuration(s) = {n} "
          f"runs of {len(tasks) * args.questions} questions, at most {args.max_time:.0f} s per phase; "
          f"KV budget {args.budget or 'SGLang default'} tokens; writing {out}", file=sys.stderr, flush=True)
    run = sweep.run_bench(spec, log=lambda m: print(m, file=sys.stderr, flush=True))
    print((run / "report.md").read_text())
    print(f"report: {run / 'report.md'}")
    return 0


def cmd_check_server(args) -> int:
    from kvsqueeze.harness import faults

    kinds = _split([args.cases]) if args.cases else list(faults.KINDS)
    campaign = faults.Campaign(args.url, budget_tokens=args.budget_tokens, seed=args.seed,
                               log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"kvsqueeze check-server {args.url}: cases {', '.join(kinds)} (KV budget {campaign.budget} tokens)",
          file=sys.stderr, flush=True)
    results = campaign.run(kinds)
    print(faults.table(results, args.label or args.url))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(faults.to_dicts(results), indent=1) + "\n")
    bad = [r.case for r in results if not r.ok]
    print(f"{len(results) - len(bad)}/{len(results)} cases survived with nothing leaked"
          + (f"; failed: {', '.join(bad)}" if bad else ""))
    return 0 if not bad else 1


def cmd_report(args) -> int:
    from kvsqueeze.harness import campaign_report, report

    runs = [Path(r) for r in args.runs]
    kinds = {campaign_report.is_campaign(r) for r in runs}
    if kinds == {True}:
        if len(runs) == 1 and args.out:
            raise bad_value("out", args.out, "no --out for one campaign (its report is rebuilt in its folder)")
        if len(runs) > 1 and not args.out:
            raise bad_value("out", None, "a directory for the comparison of several campaigns (--out DIR)")
        path = campaign_report.build(runs[0]) if len(runs) == 1 else campaign_report.build_many(runs, Path(args.out))
        print(path.read_text())
        print(f"report: {path}")
        return 0
    if len(kinds) > 1:
        raise bad_value("runs", " ".join(map(str, runs)), "bench runs or campaigns, not both")
    out = Path(args.out) if args.out else (runs[0] if len(runs) == 1 else None)
    if out is None:
        raise bad_value("out", None, "a directory for the comparison of several runs (--out DIR)")
    path = report.build_many(runs, out)
    print(path.read_text())
    print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvsqueeze", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("methods", help="list the registered compression methods")

    m = sub.add_parser("model", help="materialise the embedded model (or check --model) and print its path")
    m.add_argument("--model", default=None, help="a local Hugging Face checkpoint (default: embedded)")

    e = sub.add_parser("eval", help="quality of a compressed KV cache against the dense cache")
    e.add_argument("--method", action="append", required=True, metavar="METHOD[:SETTING[:VARIANT]]",
                   help="methods, comma-separated or repeated (see `kvsqueeze methods`): e.g. snapkv "
                        "(with --ratio), kvtc:8, dms:4 or dms:DIR, fusion:0.9:token")
    e.add_argument("--ratio", default=None, help="target ratio(s), e.g. 4 or 2,4,8")
    e.add_argument("--model", default=None, help="a local Hugging Face checkpoint (default: embedded)")
    e.add_argument("--checkpoint", default=None, help="DMS checkpoint directory (for --method dms)")
    e.add_argument("--dms-scored", choices=("keep", "evict"), default=None,
                   help="DMS and the scored tokens: keep (default; prefix-only eviction, as every other "
                        "method) or evict (the gates evict scored tokens too, as in generation)")
    e.add_argument("--calibration", default=None,
                   help="KVTC calibration file (for --method kvtc; default: made once per model)")
    e.add_argument("--threshold", default=None,
                   help="fusion: cosine threshold(s) for fusing blocks, e.g. 0.8 or 0.6,0.8,0.95 "
                        "(default 0.9)")
    e.add_argument("--block-size", type=int, default=DEFAULT_BLOCK, help="fusion: tokens per block")
    e.add_argument("--similarity", default=None,
                   help="fusion: block (cosine of whole key blocks) and/or token (min per-token cosine; "
                        "the default)")
    e.add_argument("--grouping", choices=GROUPINGS, default=DEFAULT_GROUPING,
                   help="fusion: batch (the paper's recursive halving of the requests or chunks, the "
                        "default) or split (complete linkage around two pivots)")
    e.add_argument("--scope", choices=SCOPES, default=DEFAULT_SCOPE,
                   help="fusion (one prefix): chunks (the default, the paper's CFF: blocks on the page "
                        "grid, across the chunks of one window) or any (any two blocks of the "
                        "compressible middle)")
    e.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS,
                   help="fusion --scope chunks: tokens per chunk (a multiple of --block-size)")
    e.add_argument("--window-chunks", type=int, default=DEFAULT_WINDOW_CHUNKS,
                   help="fusion --scope chunks: chunks fused together (the last N chunks)")
    e.add_argument("--workload", default=None,
                   help="fusion across requests of near-duplicate traffic: edits, fewshot, chat "
                        "(comma-separated)")
    e.add_argument("--requests", type=int, default=8, help="--workload: requests per kind")
    e.add_argument("--shared-pages", action="store_true",
                   help="--workload: whole pages shared in every layer (a token-slot pool such as "
                        "SGLang's); decided on the fused layers jointly")
    e.add_argument("--online", action="store_true",
                   help="--workload: the SGLang integration's decisions (arrival order; a new page reads "
                        "the most similar earlier page unchanged, in every layer)")
    e.add_argument("--text", nargs="+", default=None, help="held-out text file(s) (default: corpus on disk)")
    e.add_argument("--task", choices=("kl", "passkey"), default="kl")
    e.add_argument("--prefix-tokens", type=int, default=1024)
    e.add_argument("--scored-tokens", type=int, default=256)
    e.add_argument("--segments", type=int, default=12)
    e.add_argument("--sinks", type=int, default=4)
    e.add_argument("--recent", type=int, default=64)
    e.add_argument("--trials", type=int, default=20, help="passkey trials")
    e.add_argument("--context-tokens", type=int, default=1024, help="passkey prompt length")
    e.add_argument("--paired-against", default=None, metavar="METHOD",
                   help="also print each method's KL minus METHOD's at the same ratio, paired")
    e.add_argument("--json", default=None, help="write the records as a JSON list to this file")

    d = sub.add_parser("dms", help="DMS: retrofit training of eviction gates")
    dsub = d.add_subparsers(dest="dms_command", required=True)
    t = dsub.add_parser("train", help="distil DMS gates into a model (resumable)")
    t.add_argument("--model", default=None, help="a local Hugging Face checkpoint (default: embedded)")
    t.add_argument("--target-ratio", type=float, required=True)
    t.add_argument("--out", required=True, help="output directory (re-run to resume)")
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--ramp-steps", type=int, default=300, help="steps over which the target rises to CR")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--lr", type=float, default=3e-5)
    t.add_argument("--mode", choices=("adapter", "full"), default="adapter")
    t.add_argument("--window", type=int, default=64)
    t.add_argument("--sinks", type=int, default=4, help="first tokens never evicted (0: as the paper)")
    t.add_argument("--forward", choices=("soft", "straight_through"), default="soft",
                   help="training mask: relaxed decisions (released recipe) or hard ones")
    t.add_argument("--gate", choices=("projection", "query_neuron"), default="projection")
    t.add_argument("--granularity", choices=("head", "layer"), default="head")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=50)
    t.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is present")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    t.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: forwards under bf16 autocast (faster on CPUs with AVX512-BF16/AMX "
                        "and on GPUs); gates, optimiser and losses stay float32")
    t.add_argument("--lr-decay", choices=("none", "cosine"), default="none",
                   help="cosine: after the ramp, the learning rate falls along a half cosine to 0 "
                        "at the last step")
    t.add_argument("--init", choices=("zeros", "attention"), default="zeros",
                   help="attention: before training, fit the gates to evict the keys the teacher "
                        "attends least once they leave the window (a warm start at the target ratio)")
    t.add_argument("--init-sequences", type=int, default=8,
                   help="calibration sequences read by --init attention")
    t.add_argument("--teacher", choices=("zeroed", "intact"), default="zeroed",
                   help="query_neuron gates: the teacher has the repurposed neuron zeroed too (the "
                        "released recipe) or is the original model")
    t.add_argument("--compression-loss", choices=("sequence", "batch"), default="sequence",
                   help="hinge per sequence over every decision (the released recipe) or of the batch "
                        "mean (how the shipped gates were trained)")

    o = dsub.add_parser("offset", help="fit the gates' offset to a target ratio on your own text")
    o.add_argument("--method", default="dms:8", metavar="dms:RATIO|dms:DIR",
                   help="the gates to fit (default: the shipped 8x gates)")
    o.add_argument("--text", nargs="+", required=True, help="text file(s) like the traffic to serve")
    o.add_argument("--out", required=True, help="new checkpoint directory (use as dms:DIR)")
    o.add_argument("--target", type=float, default=None,
                   help="ratio to reach (default: the method's: dms:8 -> 8)")
    o.add_argument("--segments", type=int, default=4, help="prefills of --prefix-tokens to fit on")
    o.add_argument("--prefix-tokens", type=int, default=1024)
    o.add_argument("--model", default=None, help="a local Hugging Face checkpoint (default: embedded)")

    k = sub.add_parser("kvtc", help="KVTC: calibration of the transform codec")
    ksub = k.add_subparsers(dest="kvtc_command", required=True)
    c = ksub.add_parser("calibrate", help="fit PCA, rate tables and clipping on calibration text")
    c.add_argument("--model", default=None, help="a local Hugging Face checkpoint (default: embedded)")
    c.add_argument("--text", nargs="+", default=None,
                   help="calibration text file(s) (default: stdlib docstrings and licence texts)")
    c.add_argument("--out", required=True, help="calibration file to write (.safetensors)")
    c.add_argument("--seq-len", type=int, default=1024)
    c.add_argument("--segments", type=int, default=24, help="calibration segments of --seq-len tokens")
    c.add_argument("--grouping", choices=("layer", "head"), default="layer",
                   help="PCA over all KV heads of a layer (default) or per KV head")
    c.add_argument("--no-tune", action="store_true",
                   help="skip choosing clipping and key share by KL on calibration text")
    c.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")

    s = sub.add_parser("serve", help="start a serving engine with kvsqueeze loaded "
                                     "(arguments after -- go to the engine)")
    s.add_argument("--engine", default="sglang")
    s.add_argument("--method", default=None, metavar="METHOD[:SETTING[:VARIANT]][+...]",
                   help="what the server runs: none (default), dms:4|dms:8|dms:DIR, kvtc:RATIO, "
                        "fusion:THRESHOLD[:block|token]; kvtc composes with fusion (kvtc:8+fusion:0.9)")
    s.add_argument("--model", default=None, help="a local Hugging Face checkpoint (default: embedded)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=30000, help="0 picks a free port")
    s.add_argument("--start-timeout", type=float, default=300.0)
    s.add_argument("--store-dir", default=None,
                   help="kvtc: keep the compressed pages as files in this directory (default: host memory)")
    s.add_argument("--calibration", default=None,
                   help="kvtc: calibration file (default: the model's, made once)")
    s.add_argument("--fusion-layers", default=None,
                   help="fusion: layers whose similarity decides (a-b, list or all; default all but "
                        "the first two and last two)")
    _add_bench_parsers(sub)
    from kvsqueeze.harness import commands

    commands.add_parsers(sub)
    return p


def _add_bench_parsers(sub) -> None:
    from kvsqueeze.backends.sglang.serving import DEFAULT_SERVERS
    from kvsqueeze.harness.tasks import DEFAULT_TASKS, TASKS

    b = sub.add_parser("bench", help="W-L load sweep with Locust against SGLang servers it starts "
                                     "(or --url), with a report (arguments after -- go to SGLang)")
    b.add_argument("--grid", nargs="*", default=None,
                   help="KEY=V1,V2 items: W (samples per question), L (max generated tokens), "
                        "mode (n: one request with n=W; concurrent: W requests), endpoint "
                        "(generate, completions, chat); default W=1,4 L=8,32 mode=n "
                        "endpoint=generate")
    b.add_argument("--methods", default=None,
                   help="servers, comma-separated, each METHOD[:SETTING[:VARIANT]] or several joined by + "
                        "(as kvsqueeze serve --method): none, dms:4, dms:8, dms:DIR, kvtc:RATIO, "
                        "fusion:THRESHOLD[:block|token] (default " + ",".join(DEFAULT_SERVERS) + ")")
    b.add_argument("--url", default=None, help="target this running server instead of starting one")
    b.add_argument("--model", default=None, help="a local Hugging Face checkpoint (default: embedded)")
    b.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated, of {', '.join(TASKS)}; needle:CHARS / facts:CHARS set the context's "
                        f"characters of prose (default 2500, ~650 tokens) (default {','.join(DEFAULT_TASKS)})")
    b.add_argument("--questions", type=int, default=6, help="questions per task and configuration")
    b.add_argument("--users", type=int, default=2,
                   help="questions in flight in the pilot phase (the batch phase runs as many as fit)")
    b.add_argument("--pilot", type=int, default=2,
                   help="questions of the pilot phase, which measures a question's peak KV")
    b.add_argument("--budget", type=int, default=8192,
                   help="KV tokens of every server started (--max-total-tokens; 0: SGLang's own)")
    b.add_argument("--temperature", type=float, default=0.7)
    b.add_argument("--max-time", type=float, default=600.0, help="seconds per phase of a configuration at most")
    b.add_argument("--resume", default=None, metavar="RUN",
                   help="continue the run in directory RUN: its finished configurations are kept")
    b.add_argument("--redo", default=None, metavar="METHODS",
                   help="with --resume: these methods' configurations run again, finished or not "
                   "(to re-measure a method whose server changed; the others are kept)")
    b.add_argument("--fill-max", type=int, default=64,
                   help="when fewer questions are left than the budget holds, one more wave of this many at "
                        "most (answered ones again, for throughput only) fills the batch (0: not filled)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--calibration", default=None, help="KVTC calibration for kvtc methods")
    b.add_argument("--no-flush", action="store_true",
                   help="keep the device prefix cache between configurations")
    b.add_argument("--out", default=None, help="run directory (default results/bench-<time>)")
    f = sub.add_parser("check-server", help="a fault campaign against a running server: bad input, "
                                            "overload, abort storms, slow readers; checks after each case")
    f.add_argument("url", help="http://HOST:PORT of the server")
    f.add_argument("--cases", default=None, help="comma-separated: input, overload, abort, slow (default all)")
    f.add_argument("--budget-tokens", type=int, default=None,
                   help="the KV budget the overload burst overfills (default: the server's own)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--label", default=None, help="the server's name in the table")
    f.add_argument("--json", default=None, help="write the results as JSON to this file")
    r = sub.add_parser("report", help="rebuild the report of a bench run or a campaign, or compare bench runs")
    r.add_argument("runs", nargs="+", help="run directories written by kvsqueeze bench, or one campaign folder")
    r.add_argument("--out", default=None, help="directory of a comparison of several runs")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args, unknown = build_parser().parse_known_args(argv)
    if args.command in ("bench", "campaign", "soak") and unknown:
        build_parser().error(f"unrecognized arguments: {' '.join(unknown)} (SGLang flags go after --)")
    if args.command == "serve":
        extra = unknown + extra  # unknown flags pass through to the engine
    elif unknown:
        build_parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "methods":
            return cmd_methods(args)
        if args.command == "model":
            return cmd_model(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "serve":
            return cmd_serve(args, extra)
        if args.command == "dms":
            return cmd_dms_offset(args) if args.dms_command == "offset" else cmd_dms_train(args)
        if args.command == "kvtc":
            return cmd_kvtc_calibrate(args)
        if args.command == "bench":
            return cmd_bench(args, extra)
        if args.command == "campaign":
            from kvsqueeze.harness import commands

            return commands.cmd_campaign(args, extra)
        if args.command == "soak":
            from kvsqueeze.harness import commands

            return commands.cmd_soak(args, extra)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "check-server":
            return cmd_check_server(args)
    except KvsqueezeError as exc:
        print(f"kvsqueeze: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
