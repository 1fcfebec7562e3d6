"""Block fusion within one input (CFF) on held-out text: the groupings and scopes side by side.

Every variant of the ``fusion`` eval method is scored on the same held-out segments (prefix
compressed, the next tokens teacher-forced on it, KL against the dense cache, paired over segments):

- ``split/any``: complete linkage around two pivots, any two blocks of the compressible middle;
- ``batch/any``: the paper's grouping (recursive halving, left-right matching), each block its own item;
- ``batch/chunks``: the paper's CFF: blocks on the page grid, only across the chunks of one window of
  ``--window-chunks`` chunks of ``--chunk-tokens`` tokens (complete windows only).

Both ratios are reported: the authors' (candidate blocks over distinct fused blocks, fused layers,
no side information) and ours (bytes held, norms and indices included, against the whole dense
prefix). The 4 first and 64 last prefix tokens stay exact in every variant.

    python benchmarks/fusion_cff.py [--thresholds 0.5,0.6,0.7,0.8,0.9] [--segments 12]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import write  # noqa: E402
from kvsqueeze import corpus, evaluate  # noqa: E402
from kvsqueeze.methods.fusion.config import check_similarity, check_threshold  # noqa: E402
from kvsqueeze.methods.fusion.method import BlockFusion  # noqa: E402
from kvsqueeze.model import load_hf, resolve_model  # noqa: E402

def planted_pairs(ns=(4, 64, 256), trials: int = 40, dim: int = 96, threshold: float = 0.75) -> list[dict]:
    """How often each grouping fuses one planted near-duplicate pair (cosine ~0.85-0.9) among n random
    blocks, each block its own item."""
    from kvsqueeze.kernels.fusion_gram import block_gram_reference
    from kvsqueeze.methods.fusion.grouping import group_blocks, group_items

    out = []
    for n in ns:
        g = torch.Generator().manual_seed(n)
        hits = {"batch": 0, "split": 0}
        cos = []
        for _ in range(trials):
            x = torch.randn(n, dim, generator=g)
            i, j = torch.randperm(n, generator=g)[:2].tolist()
            x[j] = x[i] + 0.5 * torch.randn(dim, generator=g)
            cos.append(float(torch.nn.functional.cosine_similarity(x[i], x[j], dim=0)))
            batch, _ = group_items([x], 1, [[r] for r in range(n)], threshold)
            split = group_blocks(block_gram_reference(x)[1], threshold)
            hits["batch"] += any(i in grp and j in grp for grp in batch)
            hits["split"] += any(i in grp and j in grp for grp in split)
        out.append({"n": n, "trials": trials, "threshold": threshold, "pair_cosine_mean": sum(cos) / trials,
                    "fused_batch": hits["batch"], "fused_split": hits["split"]})
    return out


VARIANTS = {"split/any": {"grouping": "split", "scope": "any"},
            "batch/any": {"grouping": "batch", "scope": "any"},
            "batch/chunks": {"grouping": "batch", "scope": "chunks"}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thresholds", default="0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--similarity", default="block", help="block (the paper's) or token")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=", ".join(VARIANTS))
    ap.add_argument("--chunk-tokens", type=int, default=128)
    ap.add_argument("--window-chunks", type=int, default=8)
    ap.add_argument("--segments", type=int, default=12)
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--scored-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "fusion" / "cff"))
    a = ap.parse_args()
    thresholds = [check_threshold(float(t)) for t in a.thresholds.split(",") if t]
    sim = check_similarity(a.similarity)
    names = [v for v in a.variants.split(",") if v]
    for v in names:
        if v not in VARIANTS:
            ap.error(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    torch.set_num_threads(a.threads)
    methods, labels = [], []
    for v in names:
        for t in thresholds:
            methods.append(BlockFusion(threshold=t, similarity=sim, chunk_tokens=a.chunk_tokens,
                                       window_chunks=a.window_chunks, **VARIANTS[v]))
            labels.append((v, t))
    planted = planted_pairs()
    for r in planted:
        print(f"planted pair among {r['n']} blocks: batch {r['fused_batch']}/{r['trials']}, split "
              f"{r['fused_split']}/{r['trials']}", flush=True)
    path = resolve_model(None)
    tok, model = load_hf(path)
    segs = [ids for _, ids in corpus.token_segments(
        corpus.heldout_documents(), tok, a.prefix_tokens + a.scored_tokens + 1, a.segments)]
    t0 = time.monotonic()

    def progress(i, n):
        print(f"\rsegments {i}/{n}  {time.monotonic() - t0:.0f}s", end="", file=sys.stderr, flush=True)

    recs = evaluate.evaluate_kl(model, segs, methods, a.prefix_tokens, a.scored_tokens, path.name,
                                progress=progress)
    print(file=sys.stderr)
    rows = []
    for (v, t), r in zip(labels, recs):
        row = {"variant": v, "threshold": t, "similarity": sim, "ratio_bytes": r.ratio_achieved,
               "ratio_paper": r.details["ratio_paper"], "fused_share": r.details["fused_share"],
               "kl_mean": r.kl_mean, "kl_se": r.kl_se, "top1": r.top1, "ppl_delta_pct": r.ppl_delta_pct,
               "kl_per_segment": r.kl_per_segment}
        rows.append(row)
        print(f"{v:13s} t={t:<4g} ours {row['ratio_bytes']:.3f}x  paper's {row['ratio_paper']:.3f}x  "
              f"KL {r.kl_mean:.4f} +- {r.kl_se:.4f}  top-1 {r.top1:.3f}", flush=True)
    meta = {"command": "python benchmarks/fusion_cff.py " + " ".join(sys.argv[1:]),
            "model": path.name, "segments": len(segs), "prefix_tokens": a.prefix_tokens,
            "scored_tokens": a.scored_tokens, "block_size": 16, "layers": "2..L-3",
            "sinks": 4, "recent": 64, "chunk_tokens": a.chunk_tokens, "window_chunks": a.window_chunks,
            "seconds": round(time.monotonic() - t0, 1)}
    lines = ["# Block fusion within one input (CFF), held-out text", "",
             f"`{meta['command']}`: {len(segs)} held-out segments of {a.prefix_tokens}+{a.scored_tokens} "
             f"tokens, {sim} similarity, 16-token blocks, layers 2..L-3, first 4 and last 64 prefix "
             f"tokens exact; chunks scope: {a.chunk_tokens}-token chunks, windows of "
             f"{a.window_chunks} chunks. KL = mean over segments of KL(dense || fused) ± SE.", "",
             "Ours: bytes held (one block per group + per-member norms and index) against the dense "
             "prefix. Paper's: candidate blocks over distinct fused blocks (fused layers only, no side "
             "information).", "",
             "| variant | threshold | ours (bytes) | paper's | fused share | KL mean ± SE | top-1 | ppl Δ |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['threshold']:g} | {r['ratio_bytes']:.3f}x | "
                     f"{r['ratio_paper']:.3f}x | {r['fused_share']:.3f} | {r['kl_mean']:.4f} ± "
                     f"{r['kl_se']:.4f} | {r['top1']:.3f} | {r['ppl_delta_pct']:+.2f}% |")
    lines += ["", "Planted near-duplicates: one pair (mean cosine below) among n random 96-dim blocks, "
              "threshold 0.75, each block its own item; trials in which the pair fused:", "",
              "| n | pair cosine | batch (paper's) | split |", "|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['pair_cosine_mean']:.3f} | {r['fused_batch']}/{r['trials']} | "
              f"{r['fused_split']}/{r['trials']} |" for r in planted]
    write(a.out, {"meta": meta, "records": rows, "planted_pairs": planted}, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
