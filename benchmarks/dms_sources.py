"""The ratio DMS's learned gates reach on unseen text, per kind of text, and what fitting the gates'
offset on a little of the user's own text does.

For each shipped checkpoint and each held-out source (``kvsqueeze.corpus.heldout_sources``: Python
docs, package READMEs, release notes, Python code), segments of 1024 + 256 tokens are split into
calibration segments (``--calib``) and evaluation segments (``--segments``, disjoint). On the
evaluation segments DMS is scored as in ``kvsqueeze eval`` (prefix-only eviction, the scored tokens
teacher-forced, KL against the dense cache), once with the shipped gates and once with the offset
fitted on that source's calibration segments (``kvsqueeze.methods.dms.offset.calibrate_offset``).
Reported: the achieved ratio (mean and per-segment range), KL ± SE, and the fitted offset.

    python benchmarks/dms_sources.py [--ratios 4,8] [--segments 8] [--calib 3]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import write  # noqa: E402
from kvsqueeze import corpus  # noqa: E402
from kvsqueeze.cache import CompressedPrefix  # noqa: E402
from kvsqueeze.forward import continue_with, dense_prefill, distribution_metrics  # noqa: E402
from kvsqueeze.methods.dms.method import DMSMethod  # noqa: E402
from kvsqueeze.methods.dms.offset import calibrate_offset  # noqa: E402
from kvsqueeze.model import load_hf, resolve_model  # noqa: E402


def _se(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1) / len(xs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="4,8", help="shipped gates to measure")
    ap.add_argument("--segments", type=int, default=8, help="evaluation segments per source")
    ap.add_argument("--calib", type=int, default=3, help="calibration segments per source")
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--scored-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "dms" / "sources"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ratios = [float(r) for r in a.ratios.split(",") if r]
    path = resolve_model(None)
    tok, model = load_hf(path)
    n, p = a.prefix_tokens + a.scored_tokens + 1, a.prefix_tokens
    sources = {}
    for name, docs in corpus.heldout_sources().items():
        segs = [torch.tensor(ids) for _, ids in corpus.token_segments(docs, tok, n, a.calib + a.segments,
                                                                      what=name)]
        sources[name] = (segs[:a.calib], segs[a.calib:])
        print(f"{name}: {len(segs)} segments", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    rows = []
    for name, (calib, evals) in sources.items():
        refs = []
        for ids in evals:
            cache, _ = dense_prefill(model, ids[:p])
            refs.append(continue_with(model, CompressedPrefix.dense(cache), ids[p:-1]))
        for ratio in ratios:
            shipped = DMSMethod(ratio=ratio)
            fit = calibrate_offset(model, shipped, [ids[:p] for ids in calib],
                                   log=lambda m: print(f"  {name} {ratio:g}x {m}", file=sys.stderr, flush=True))
            fitted = DMSMethod(ratio=ratio, offset=fit["offset"])
            for label, m in (("shipped", shipped), ("offset fitted", fitted)):
                seg_ratio, kls = [], []
                for ids, ref in zip(evals, refs):
                    seg = m.run_segment(model, ids[:p], ids[p:-1])
                    kl, _, _, _ = distribution_metrics(ref, seg.logits, ids[p + 1:])
                    seg_ratio.append(seg.ratio)
                    kls.append(float(kl.mean()))
                m.unbind(model)
                row = {"source": name, "gates": f"{ratio:g}x", "variant": label, "offset": m.offset,
                       "ratio_mean": sum(seg_ratio) / len(seg_ratio), "ratio_min": min(seg_ratio),
                       "ratio_max": max(seg_ratio), "ratio_per_segment": seg_ratio,
                       "kl_mean": sum(kls) / len(kls), "kl_se": _se(kls), "kl_per_segment": kls,
                       "calibration": fit if label != "shipped" else None}
                rows.append(row)
                print(f"{name:16s} {ratio:g}x {label:13s} offset {m.offset:+.3f}  ratio "
                      f"{row['ratio_mean']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})  KL "
                      f"{row['kl_mean']:.4f} +- {row['kl_se']:.4f}  [{time.monotonic() - t0:.0f}s]",
                      flush=True)
    meta = {"command": "python benchmarks/dms_sources.py " + " ".join(sys.argv[1:]), "model": path.name,
            "prefix_tokens": p, "scored_tokens": a.scored_tokens, "segments": a.segments,
            "calibration_segments": a.calib, "seconds": round(time.monotonic() - t0, 1),
            "sources": {k: len(v[1]) for k, v in sources.items()}}
    lines = ["# DMS on unseen text, per source", "",
             f"`{meta['command']}`: per source {a.segments} evaluation segments of {p}+{a.scored_tokens} "
             f"tokens (prefix-only eviction, scored tokens held; KL against the dense cache) and "
             f"{a.calib} other segments to fit the gates' offset to the target ratio. Ratio: prefix "
             "tokens over tokens held after prefill (layers x KV heads), mean and range over segments.", "",
             "| source | gates | variant | offset | ratio mean | ratio range | KL mean ± SE |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['source']} | {r['gates']} | {r['variant']} | {r['offset']:+.3f} | "
                     f"{r['ratio_mean']:.2f}x | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} | "
                     f"{r['kl_mean']:.4f} ± {r['kl_se']:.4f} |")
    write(a.out, {"meta": meta, "records": rows}, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
