"""Fitting the DMS gates' offset to a target ratio on a user's own text.

A learned gate reaches the ratio it was trained for on text like its training text; on other text
it evicts more or less. One number added to every gate logit (the config's ``logit_bias``) moves
every decision the same way; :func:`calibrate_offset` finds the offset at which the prefill of the
given segments holds ``1 / target`` of their tokens. The decisions of later layers depend on what
earlier layers evicted, so the fit iterates: measure the ratio and the deciding logits at the
current offset, move the offset to the quantile of those logits that would flag the missing
fraction, and measure again.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from kvsqueeze.attention import AttentionState, attention_state
from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.methods.dms import rule
from kvsqueeze.methods.dms.config import GATES_FILE
from kvsqueeze.methods.dms.method import DMSMethod, with_offset
from kvsqueeze.methods.dms.run import DMSRun, held_after


@torch.inference_mode()
def prefill_ratio(model, method: DMSMethod, segments: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """The ratio ``method`` achieves over the prefill of ``segments`` (tokens over tokens held,
    summed over segments, layers and KV heads) and every deciding logit of those prefills (float32,
    sinks excluded)."""
    gates = method.bind(model)
    n_kv = model.config.num_key_value_heads
    total = kept = 0
    logits = []
    for ids in segments:
        run = DMSRun(method.config, mode="hard", gates=gates)
        with attention_state(AttentionState(dms=run)):
            model(ids[None])
        held = held_after(run, len(ids), n_kv)
        total += len(ids) * n_kv * len(held)
        kept += int(sum(h.sum().item() for h in held))
        for layer in sorted(run.logits):
            lg = rule.deciding(run.logits[layer], len(ids))[..., method.config.sinks:]
            logits.append(lg.expand(-1, n_kv, -1).reshape(-1).float())
    return total / max(kept, 1), torch.cat(logits)


def calibrate_offset(model, method: DMSMethod, segments: list[torch.Tensor], target: float | None = None,
                     iterations: int = 4, tolerance: float = 0.02, log=None) -> dict:
    """The offset at which ``method``'s gates reach ``target`` (default: the method's ratio: ``dms:8``
    -> 8, a checkpoint's target ratio otherwise) on ``segments`` (prefills of token ids), within
    ``tolerance`` (relative) or after ``iterations`` measurements. Returns the offset, the ratio
    before and after, and each step."""
    target = float(method.ratio if target is None else target)
    if not target > 1:
        raise bad_value("target", target, "a ratio > 1")
    if not segments:
        raise bad_value("segments", 0, "at least one segment of calibration text")
    offset, steps = method.offset, []
    current = method
    for _ in range(iterations):
        ratio, logits = prefill_ratio(model, current, segments)
        steps.append({"offset": offset, "ratio": ratio})
        if log:
            log(f"offset {offset:+.3f}: ratio {ratio:.3f} (target {target:g})")
        if abs(ratio / target - 1) <= tolerance:
            break
        flagged = float((logits > 0).float().mean())
        need = min(max(flagged + 1 / ratio - 1 / target, 0.0), 1.0)  # held fraction ~ 1 - flagged
        shift = -float(torch.quantile(logits, 1 - need)) if 0 < need < 1 else 0.0
        if shift == 0.0:
            break
        offset += shift
        current.unbind(model)
        current = DMSMethod(checkpoint=str(method.checkpoint), scored=method.scored, offset=offset,
                            sinks=method.sinks, recent=method.recent)
    current.unbind(model)
    best = min(steps, key=lambda s: abs(s["ratio"] / target - 1))
    return {"offset": best["offset"], "ratio": best["ratio"], "ratio_before": steps[0]["ratio"],
            "target": target, "steps": steps}


def save_with_offset(method: DMSMethod, offset: float, target: float, out_dir, fit: dict | None = None):
    """A kvsqueeze checkpoint at ``out_dir`` with ``method``'s gates and ``offset`` folded into the
    config's logit bias (``target_ratio`` set to ``target``), loadable as ``dms:OUT_DIR``; the fit,
    if given, is kept in ``offset.json``. Only the gates and config are written: a checkpoint that
    is a whole model keeps its weights where they are (pass ``--model`` to use them)."""
    src = Path(method.checkpoint)
    if not (src / GATES_FILE).is_file():
        raise KvsqueezeError(f"checkpoint={str(src)!r}: {GATES_FILE} is missing; an offset is written "
                             "for kvsqueeze checkpoints (a released checkpoint: pass offset= to the "
                             "dms method instead)")
    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise bad_value("out", str(out_dir), "a directory other than the checkpoint's")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / GATES_FILE, out / GATES_FILE)
    base = with_offset(method.config, -method.offset)  # the checkpoint's own config
    replace(with_offset(base, offset), target_ratio=float(target)).save(out)
    (out / "offset.json").write_text(json.dumps({"source_checkpoint": str(src), "offset": offset,
                                                 "target": target, "fit": fit}, indent=1) + "\n")
    return out
