"""Block fusion across requests (BFF) on the near-duplicate workload: pages held and quality.

For each workload kind (``kvsqueeze.workload``: edits, fewshot, chat), each request's prompt is
prefilled densely with the embedded model; pages (16-token blocks) are counted under exact prefix
sharing (radix alone: a page is shared when the tokens up to its end agree) and with radix + fusion
(``kvsqueeze.methods.fusion.batch.fuse_batch``, fused layers 2..L-3, same-position candidates, pages counted
per layer and averaged over layers). Quality: each request's scored tokens are teacher-forced on its
fused cache and compared with its dense cache: mean KL(dense || fused) per request, top-1 agreement.

    python benchmarks/fusion_eval.py [--thresholds 0.6,0.7,0.8,0.9,0.95] [--similarity block,token]
        [--grouping batch,split]

Both ratios are reported: pages held against radix alone (ours: every layer, whole pages) and the
authors' (candidate blocks over distinct fused blocks in the deciding layers, no side information).

Target: at least 1.5x fewer pages than radix alone at mean KL <= 0.05.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import write  # noqa: E402
from kvsqueeze.evaluate import evaluate_batch_fusion  # noqa: E402
from kvsqueeze.methods.fusion.config import check_grouping  # noqa: E402
from kvsqueeze.model import load_hf, resolve_model  # noqa: E402
from kvsqueeze.workload import KINDS  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--thresholds", default="0.6,0.7,0.8,0.9,0.95,0.99")
    ap.add_argument("--similarity", default="block,token")
    ap.add_argument("--per-group", type=int, default=8)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--prefix-tokens", type=int, default=384)
    ap.add_argument("--scored-tokens", type=int, default=32)
    ap.add_argument("--grouping", default="batch",
                    help="batch (the paper's), split, or both (comma-separated), side by side")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shared-pages", action="store_true",
                    help="whole pages shared across all layers (what a stock token-slot pool holds)")
    ap.add_argument("--online", action="store_true",
                    help="with --shared-pages: the SGLang integration's decisions (arrival order, a new "
                         "page reads the most similar earlier page unchanged)")
    ap.add_argument("--out", default=str(ROOT / "results" / "fusion" / "quality"))
    ap.add_argument("--render", default=None, metavar="OUT.json",
                    help="rebuild OUT.md from a run's OUT.json, running nothing")
    a = ap.parse_args()
    if a.render:
        data = json.loads(Path(a.render).read_text())
        write(Path(a.render).with_suffix(""), data, markdown(data["meta"], data["records"]))
        return 0
    torch.set_num_threads(a.threads)
    kinds = [k for k in a.kinds.split(",") if k]
    thresholds = [float(t) for t in a.thresholds.split(",")]
    sims = [s for s in a.similarity.split(",") if s]
    tok, model = load_hf(resolve_model(None))
    t0 = time.monotonic()

    def progress(what, i, n):
        if n:
            print(f"\r{what} {i}/{n}  {time.monotonic() - t0:.0f}s", end="", file=sys.stderr,
                  flush=True)

    groupings = [g for g in a.grouping.split(",") if g]
    for g in groupings:
        check_grouping(g)
    if a.online and groupings != ["batch"]:
        ap.error("--online makes its own decisions (arrival order); --grouping does not apply")
    recs = [r for g in groupings
            for r in evaluate_batch_fusion(model, tok, kinds, thresholds, sims, per_group=a.per_group,
                                           groups=a.groups, prefix_tokens=a.prefix_tokens,
                                           scored_tokens=a.scored_tokens, shared_pages=a.shared_pages,
                                           online=a.online, grouping=g, progress=progress)]
    print(file=sys.stderr)
    records = [r.to_dict() for r in recs]
    for r in records:
        print(f"{r['kind']:8s} {r['grouping']:5s} {r['similarity']:6s} t={r['threshold']:<5g} pages "
              f"dense {r['pages_dense']} radix {r['pages_radix']} radix+fusion {r['pages_fused']:.1f} "
              f"({r['fewer_than_radix']:.2f}x fewer; paper's ratio {r['ratio_paper']:.2f}x) "
              f"KL {r['kl_mean']:.4f} (max {r['kl_max']:.4f}) top-1 {r['top1']:.3f}", flush=True)
    meta = {"command": "python benchmarks/fusion_eval.py " + " ".join(sys.argv[1:]),
            "model": "SmolLM2-135M-Instruct (embedded)", "block_size": 16,
            "layers": "2..L-3" + (" decide; every layer shared" if a.shared_pages else ""),
            "shared_pages": a.shared_pages, "online": a.online, "groupings": groupings,
            "same_position": True, "per_group": a.per_group, "prefix_tokens": a.prefix_tokens,
            "scored_tokens": a.scored_tokens, "seconds": round(time.monotonic() - t0, 1)}
    write(a.out, {"meta": meta, "records": records}, markdown(meta, records))
    return 0


def markdown(meta: dict, records: list[dict]) -> list[str]:
    """The report of one run (also rebuilt from its JSON: ``--render OUT.json``)."""
    online, shared = meta["online"], meta["shared_pages"]
    groupings = meta.get("groupings", ["split"])
    lines = ["# Block fusion across requests on near-duplicate traffic", "",
             f"`{meta['command']}`: {meta.get('per_group', 8)} requests per kind, "
             f"{meta['prefix_tokens']}-token prompts, {meta['scored_tokens']} scored tokens each; "
             "16-token pages; "
             + ("online, as inside SGLang: requests in arrival order, a new page fuses into the most "
                "similar earlier unfused page at its index (similarity = minimum over layers 2..L-3) "
                "and reads it unchanged in every layer; " if online else
                "whole pages shared in every layer (decided on layers 2..L-3, similarity = minimum "
                "over them; a fused page holds the members' mean direction x mean norm); "
                if shared else "fused layers 2..L-3; ")
             + "same-position candidates. KL = mean over requests of KL(dense || fused)."
             + ("" if online else " Grouping: " + ", ".join(groupings) + " (batch: the paper's "
                "recursive halving of the batch of requests; split: complete linkage)."), "",
             "The paper's ratio: candidate blocks over distinct fused blocks in the deciding layers "
             "(no side information); ours: pages held against radix alone, every layer.", "",
             "| kind | grouping | similarity | threshold | pages dense | radix | radix+fusion | fewer than "
             "radix | paper's ratio | KL mean | KL max | top-1 | meets 1.5x at KL<=0.05 |",
             "|" + "---|" * 13]
    for r in records:
        ok = r["fewer_than_radix"] >= 1.5 and r["kl_mean"] <= 0.05
        grouping = "online" if online else r.get("grouping", "split")
        lines.append(f"| {r['kind']} | {grouping} | {r['similarity']} | {r['threshold']:g} | "
                     f"{r['pages_dense']} | {r['pages_radix']} | {r['pages_fused']:.1f} | "
                     f"{r['fewer_than_radix']:.2f}x | {r.get('ratio_paper', float('nan')):.2f}x | "
                     f"{r['kl_mean']:.4f} | {r['kl_max']:.4f} | {r['top1']:.3f} | "
                     f"{'yes' if ok else 'no'} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
