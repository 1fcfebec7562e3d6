"""How DMS gate sets spread their evictions across held-out sequences, and at what KL.

For each checkpoint: ``--sequences`` windows of ``--seq-len`` tokens spread evenly over the held-out
text, hard decisions (inference), every token subject to eviction; per sequence the evicted fraction
of decided tokens (after the sinks, over layers and KV heads) and the mean KL(DMS || dense) of the
next-token distributions. Prints mean, standard deviation and range; writes JSON with ``--out``.
Used to ask whether gates trained one sequence per step evict more evenly than gates trained on
batches of 8 (results/README.md, docs/dms.md).

    python benchmarks/dms_gate_stats.py --label gpu-8x=results/dms/gpu-gates-8x \
        --label cpu-cos-8x=results/dms/cpu-cos-8x
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from kvsqueeze.attention import AttentionState, attention_state
from kvsqueeze.corpus import heldout_documents
from kvsqueeze.errors import bad_value
from kvsqueeze.methods.dms.checkpoint import load_config, load_gates
from kvsqueeze.methods.dms.gates import install
from kvsqueeze.methods.dms.run import DMSRun
from kvsqueeze.methods.dms.train import kl_student_teacher
from kvsqueeze.model import load_hf, resolve_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", action="append", required=True, help="NAME=CHECKPOINT_DIR")
    p.add_argument("--sequences", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON output path")
    a = p.parse_args(argv)
    labels = []
    for item in a.label:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            raise SystemExit(bad_value("label", item, "NAME=CHECKPOINT_DIR with an existing directory"))
        labels.append((name, Path(path)))
    torch.set_num_threads(a.threads)
    tok, model = load_hf(resolve_model(None))
    model.eval()
    ids = tok(heldout_documents()[0].text, add_special_tokens=False)["input_ids"]
    if len(ids) < a.seq_len * a.sequences:
        raise SystemExit(bad_value("sequences", a.sequences, f"at most {len(ids) // a.seq_len} of {a.seq_len} tokens"))
    step = (len(ids) - a.seq_len) // a.sequences
    seqs = [torch.tensor([ids[s:s + a.seq_len]]) for s in range(0, step * a.sequences, step)]
    rows = []
    for name, d in labels:
        cfg = load_config(d)
        gates = load_gates(d, model)
        handles = install(model, gates)
        fracs, kls = [], []
        with torch.no_grad():
            for x in seqs:
                with attention_state(AttentionState()):
                    dense = model(x).logits
                run = DMSRun(cfg, mode="hard", gates=gates)
                with attention_state(AttentionState(dms=run)):
                    dms = model(x).logits
                n, n_kv = x.shape[1], model.config.num_key_value_heads
                # decided keys only: after the sinks, before the newest (undecided) key
                fracs.append(torch.stack([run.eviction(layer, n, n_kv)[0][..., cfg.sinks:-1].float().mean()
                                          for layer in sorted(run.logits)]).mean().item())
                kls.append(kl_student_teacher(dms, dense).item())
        for h in handles:
            h.remove()
        row = {"label": name, "checkpoint": str(d), "evicted_mean": statistics.mean(fracs),
               "evicted_sd": statistics.pstdev(fracs), "evicted_min": min(fracs), "evicted_max": max(fracs),
               "kl_mean": statistics.mean(kls), "evicted": fracs, "kl": kls}
        rows.append(row)
        print(f"{name}: evicted mean {row['evicted_mean']:.3f} sd {row['evicted_sd']:.3f} "
              f"range {row['evicted_min']:.3f}-{row['evicted_max']:.3f}  KL {row['kl_mean']:.4f}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
