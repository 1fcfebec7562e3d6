"""Evaluate DMS checkpoints against SnapKV (both settings) and the sliding window at the ratio DMS
actually achieves.

For each checkpoint: DMS is scored on the held-out segments, then SnapKV and the window are scored on
the same segments at DMS's achieved ratio, and the paired KL differences are reported. Used for the
window ablation and for the final 4x / 8x gates. Output: a JSON list and a markdown table.

``--scored keep`` (the like-for-like protocol): DMS evicts prefix tokens only and holds the scored
tokens, as SnapKV and the window do; ``evict``: DMS's gates also evict scored tokens leaving the
window (as in generation), a harder setting than the baselines' at the same prefix ratio. Default:
both, one row each.

    python benchmarks/dms_eval.py --label w16=/tmp/dms/abl-w16 --label w64=/tmp/dms/abl-w64 \
        --segments 8 --out results/dms/window-ablation
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvsqueeze import corpus, evaluate
from kvsqueeze.methods import create
from kvsqueeze.methods.base import create_spec
from kvsqueeze.methods.eviction import SNAPKV_PRESETS
from kvsqueeze.model import load_hf, resolve_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--label", action="append", required=True, help="NAME=CHECKPOINT_DIR")
    p.add_argument("--segments", type=int, default=12)
    p.add_argument("--prefix-tokens", type=int, default=1024)
    p.add_argument("--scored-tokens", type=int, default=256)
    p.add_argument("--scored", default="keep,evict",
                   help="DMS protocol(s) for the scored tokens: keep, evict or keep,evict")
    p.add_argument("--out", required=True, help="output path without extension")
    args = p.parse_args(argv)
    protocols = [x.strip() for x in args.scored.split(",") if x.strip()]
    if not protocols or any(x not in ("keep", "evict") for x in protocols):
        p.error(f"--scored={args.scored!r}: expected keep, evict or keep,evict")

    path = resolve_model(None)
    tok, model = load_hf(path)
    segs = [ids for _, ids in corpus.token_segments(
        corpus.heldout_documents(), tok, args.prefix_tokens + args.scored_tokens + 1, args.segments)]
    rows, records = [], []
    for item in args.label:
        name, ckpt = item.split("=", 1)
        if not Path(ckpt).is_dir():
            p.error(f"--label {item!r}: {ckpt!r} is not a directory; expected NAME=CHECKPOINT_DIR")
        summary = {}
        summary_path = Path(ckpt) / "train_summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
        base = None
        for scored in protocols:
            dms = create("dms", None, checkpoint=ckpt, scored=scored)
            try:
                [rd] = evaluate.evaluate_kl(model, segs, [dms], args.prefix_tokens, args.scored_tokens,
                                            path.name)
            finally:
                dms.unbind(model)
            ratio = rd.ratio_achieved  # the prefix's: the same under both protocols
            if base is None:
                # SnapKV in both settings (ours: average pooling, 4 sinks + 64 recent kept; the
                # paper's: max pooling, the 32 window tokens kept, no sinks); DMS is compared with
                # the stronger of the two on these segments (a choice that favours the baseline)
                base = evaluate.evaluate_kl(model, segs, [create_spec(f"snapkv:{ratio}:{p}") for p in
                                                          SNAPKV_PRESETS] + [create("window", ratio)],
                                            args.prefix_tokens, args.scored_tokens, path.name)
                for r, preset in zip(base, [*SNAPKV_PRESETS, None]):
                    d = r.to_dict()
                    d["label"] = name
                    if preset:
                        d["preset"] = preset
                    records.append(d)
            *snaps, rw = base
            strongest = min(range(len(snaps)), key=lambda i: snaps[i].kl_mean)
            rs, preset = snaps[strongest], SNAPKV_PRESETS[strongest]
            ds, ses = evaluate.paired_difference(rd, rs)
            dw, sew = evaluate.paired_difference(rd, rw)
            d = rd.to_dict()
            d["label"] = name
            d["scored"] = scored
            records.append(d)
            d["against_snapkv"] = preset
            rows.append((name, scored, dms.config.window, dms.config.target_ratio, summary.get("steps"), ratio,
                         rd.kl_mean, snaps[0].kl_mean, snaps[1].kl_mean, preset, rw.kl_mean, ds, ses, dw,
                         sew, rd.top1))
            print(f"{name} ({scored} scored): ratio {ratio:.2f}x  KL dms {rd.kl_mean:.4f}  snapkv "
                  f"{snaps[0].kl_mean:.4f} (paper's setting {snaps[1].kl_mean:.4f})  window "
                  f"{rw.kl_mean:.4f}  dms - stronger snapkv ({preset}) {ds:+.4f} ± {ses:.4f}",
                  file=sys.stderr, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
    head = ("| run | scored tokens | window | train CR | steps | achieved ratio | KL dms | KL snapkv | "
            "KL snapkv (paper's setting) | KL window | dms - stronger snapkv (paired SE) | "
            "dms - window (paired SE) | top-1 dms |")
    lines = [f"Held-out: {len(segs)} segments of {args.prefix_tokens}+{args.scored_tokens} tokens; "
             "SnapKV and window evaluated at DMS's achieved ratio on the same segments. SnapKV in two "
             "settings: ours (average pooling, 4 sinks and 64 recent tokens kept) and the paper's (max "
             "pooling, kernel 7, the 32 observation-window tokens kept, no sinks); DMS is compared with "
             "the stronger of the two on these segments (marked *). Scored tokens: "
             "`keep` = DMS evicts prefix tokens only and holds the scored ones, as SnapKV and the window "
             "do (like for like); `evict` = DMS also evicts scored tokens leaving its window (as in "
             "generation; harder than the baselines' setting).", "",
             head, "|" + "---|" * 13]
    for (name, scored, w, cr, steps, ratio, kd, ks, kp, preset, kw, ds, ses, dw, sew, t1) in rows:
        star = {"default": ("*", ""), "paper": ("", "*")}[preset]
        lines.append(f"| {name} | {scored} | {w} | {cr:g} | {steps} | {ratio:.2f} | {kd:.4f} | "
                     f"{ks:.4f}{star[0]} | {kp:.4f}{star[1]} | {kw:.4f} | {ds:+.4f} ({ses:.4f}) | "
                     f"{dw:+.4f} ({sew:.4f}) | {t1:.3f} |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
