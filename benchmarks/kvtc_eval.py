"""KVTC quality against ratio on held-out text, with the int4/int2 baselines at the same ratios.

Ratios are over the compressed tokens (every blob byte against 16-bit K+V of those tokens; for
int4/int2: codes, scales and minimums); sinks (4) and the recent window (64) stay exact for every
method, so the overall ratios (also reported) are lower. KVTC also runs at the int4 and int2
compressed-token ratios, so each baseline has a KVTC point at its own ratio. Paired differences
(same segments) against the baselines are printed.

    python benchmarks/kvtc_eval.py [--calibration FILE] [--ratios 4,8,12,16,20] [--segments 12]

Writes results/kvtc/quality.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--ratios", default="4,6,8,12,16,20")
    ap.add_argument("--segments", type=int, default=12)
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--scored-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="results/kvtc/quality")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from kvsqueeze import corpus, evaluate
    from kvsqueeze.methods import create
    from kvsqueeze.model import load_hf, resolve_model

    tok, model = load_hf(resolve_model(None))
    baselines = [create("int4"), create("int2")]
    # compressed-token ratio of the int baselines (codes + 16-bit scale and minimum per group of 64)
    same = [16 / (b.bits + 2 * 16 / b.group) for b in baselines]
    ratios = sorted({float(r) for r in args.ratios.split(",")} | {round(r, 3) for r in same})
    kv = [create("kvtc", ratio=r, calibration=args.calibration) for r in ratios]
    segs = corpus.token_segments(corpus.heldout_documents(), tok, args.prefix_tokens + args.scored_tokens + 1,
                                 args.segments)
    t0 = time.time()
    recs = evaluate.evaluate_kl(model, [s for _, s in segs], kv + baselines, args.prefix_tokens,
                                args.scored_tokens, resolve_model(None).name,
                                progress=lambda i, n: print(f"segment {i}/{n} {time.time() - t0:.0f}s",
                                                            file=sys.stderr, flush=True))
    rows = []
    for r in recs:
        rows.append({"method": r.method, "ratio_target": r.ratio_target,
                     "ratio_compressed": r.details.get("ratio_compressed"), "ratio_overall": r.ratio_achieved,
                     "kl_mean": r.kl_mean, "kl_se": r.kl_se, "top1": r.top1, "ppl_delta_pct": r.ppl_delta_pct,
                     "kl_per_segment": r.kl_per_segment})
    paired = []
    for b, r_same in zip(recs[len(kv):], same):
        k = min(recs[:len(kv)], key=lambda x: abs(x.ratio_target - round(r_same, 3)))
        d, se = evaluate.paired_difference(k, b)
        paired.append({"baseline": b.method, "ratio": r_same, "kvtc_minus_baseline": d, "se": se})
    cal = kv[0].calibration
    meta = {"segments": len(segs), "prefix_tokens": args.prefix_tokens, "scored_tokens": args.scored_tokens,
            "sinks": 4, "recent": 64, "calibration": cal.fingerprint(), "calibration_info": {
                k: v for k, v in cal.info.items() if k != "sources"}, "seconds": round(time.time() - t0)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "paired": paired}, indent=1) + "\n")
    lines = ["# KVTC: quality against ratio (held-out text)", "",
             f"{len(segs)} segments of {args.prefix_tokens}+{args.scored_tokens} tokens (Python docs topics), "
             "embedded SmolLM2-135M-Instruct, sinks 4 and recent 64 exact. KL = mean KL(dense || method) "
             "of next-token distributions, ± SE over segments.", "",
             "| method | target | ratio over compressed tokens | overall ratio | KL | ± SE | top-1 | PPL Δ% |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio_target']:.3g} | {r['ratio_compressed']:.2f}x | "
                     f"{r['ratio_overall']:.2f}x | {r['kl_mean']:.3g} | {r['kl_se']:.2g} | {r['top1']:.3f} | "
                     f"{r['ppl_delta_pct']:+.2f} |")
    lines += ["", "Paired (same segments), KVTC at the baseline's own compressed-token ratio:", ""]
    for p in paired:
        lines.append(f"- {p['baseline']} at {p['ratio']:.2f}x: KL(kvtc) - KL({p['baseline']}) = "
                     f"{p['kvtc_minus_baseline']:+.4f} ± {p['se']:.4f}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        kvr = [r for r in rows if r["method"] == "kvtc"]
        ax.errorbar([r["ratio_compressed"] for r in kvr], [r["kl_mean"] for r in kvr],
                    yerr=[r["kl_se"] for r in kvr], marker="o", label="kvtc")
        for r in rows:
            if r["method"] != "kvtc":
                ax.errorbar([r["ratio_compressed"]], [r["kl_mean"]], yerr=[r["kl_se"]], marker="s",
                            linestyle="none", label=r["method"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compression ratio over compressed tokens (vs 16-bit K+V)")
        ax.set_ylabel("mean KL(dense || method)")
        ax.set_title("KVTC vs integer quantization, SmolLM2-135M, held-out text")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    print(f"wrote {out}.json/.md/.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
