"""The ``dms`` method of ``kvsqueeze eval``: DMS decides inside the forward pass, so it is evaluated
with :meth:`DMSMethod.run_segment` and :meth:`DMSMethod.greedy`, not by compressing a finished cache."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from kvsqueeze.attention import AttentionState, attention_state
from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.methods.base import CompressionMethod, Segment, register
from kvsqueeze.methods.dms.cache import DMSCache
from kvsqueeze.methods.dms.checkpoint import load_config, load_gates, shipped_gates_dir, shipped_ratios
from kvsqueeze.methods.dms.gates import DMSGates, install
from kvsqueeze.methods.dms.run import DMSRun, held_after

SCORED = ("keep", "evict")


def with_offset(config, offset: float):
    """``config`` with ``offset`` added to its gate logit bias."""
    return config if not offset else replace(config, logit_bias=config.logit_bias + offset)


def resolve_checkpoint(ratio: float | None, checkpoint: str | Path | None) -> Path:
    """The checkpoint directory DMS runs with: ``checkpoint``, or the gates shipped for the embedded
    model at ``ratio``."""
    if checkpoint is None:
        if ratio is None:
            raise KvsqueezeError("method 'dms' needs a ratio (dms:4, the shipped gates) or a checkpoint "
                                 "(dms:DIR from `kvsqueeze dms train`)")
        d = shipped_gates_dir(float(ratio))
        if not d.is_dir():
            raise bad_value("ratio", float(ratio), "a ratio the shipped DMS gates have ("
                            + ", ".join(f"{r:g}" for r in shipped_ratios())
                            + "), or a checkpoint DIR from `kvsqueeze dms train`")
        return d
    d = Path(checkpoint)
    if not d.is_dir():
        raise bad_value("checkpoint", str(checkpoint), "a DMS checkpoint directory")
    return d


@register
class DMSMethod(CompressionMethod):
    """Learned per-head eviction with a delayed window (needs trained gates).

    ``checkpoint``: a directory from ``kvsqueeze dms train`` (or a released Model-Optimizer one);
    without it, the gates shipped for the embedded model at ``ratio`` are used. What DMS holds is the
    ``sinks`` first tokens (4 by default; 0 in the released checkpoints), the window of the ``window``
    most recent tokens, and the tokens its gates keep. The achieved ratio is the prefix tokens over
    the tokens actually held after prefill, summed over layers and KV heads.

    ``offset``: added to every gate logit (to the config's ``logit_bias``): positive evicts more; see
    :func:`kvsqueeze.methods.dms.offset.calibrate_offset`, which fits it to a target ratio on a
    user's own text.

    ``scored``: what happens to the scored continuation. ``"keep"`` (default): DMS compresses the
    prefix only and holds every scored token, as every other method of ``kvsqueeze eval`` does
    (their ratio is the prefix's, and so is DMS's); flagged prefix tokens still leave as the window
    moves on. ``"evict"``: the gates also evict scored tokens that leave the window, as DMS does while
    it generates (a harder setting than the baselines', at the same prefix ratio).

    Spelling: ``dms:4`` (shipped gates at 4x) or ``dms:DIR`` (a checkpoint).
    """

    name = "dms"
    summary = "Dynamic Memory Sparsification: learned per-head eviction, delayed by a window"
    ratio_unit = "prefix tokens / tokens held after prefill (layers x KV heads)"

    def __init__(self, ratio=None, sinks=4, recent=64, checkpoint: str | None = None, scored: str = "keep",
                 offset: float = 0.0, **options):
        if scored not in SCORED:
            raise bad_value("scored", scored, "'keep' (prefix-only eviction) or 'evict' (scored "
                            "tokens evicted too)")
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise bad_value("offset", offset, "a finite number added to the gate logits")
        self.scored = scored
        self.offset = float(offset)
        self.checkpoint = resolve_checkpoint(ratio, checkpoint)
        self.config = with_offset(load_config(self.checkpoint), self.offset)
        super().__init__(self.config.target_ratio if ratio is None else ratio, sinks, recent, **options)
        self._bound: dict[int, tuple[DMSGates, list]] = {}

    @classmethod
    def spec_options(cls, setting, variant) -> dict:
        """``dms:4`` -> the shipped 4x gates; ``dms:DIR`` -> that checkpoint."""
        if variant is not None:
            raise bad_value("method", f"dms:{setting}:{variant}", "dms:RATIO or dms:CHECKPOINT_DIR")
        if setting is None:
            return {}
        try:
            return {"ratio": float(setting)}
        except ValueError:
            return {"checkpoint": setting}

    def bind(self, model) -> DMSGates:
        """Install this method's gates on ``model`` (once) and return them (inert outside a run naming
        them)."""
        if id(model) not in self._bound:
            gates = load_gates(self.checkpoint, model)
            gates.config = self.config  # the checkpoint's, with this method's offset
            self._bound[id(model)] = (gates, install(model, gates))
        return self._bound[id(model)][0]

    def unbind(self, model) -> None:
        gates_handles = self._bound.pop(id(model), None)
        if gates_handles is not None:
            for h in gates_handles[1]:
                h.remove()

    def describe(self) -> str:
        return (f"{self.name}@{self.ratio:g}x" + (f"{self.offset:+g}" if self.offset else "")
                + ("" if self.scored == "keep" else "(evict-scored)"))

    def segment_details(self) -> dict:
        """Recorded with each evaluation: 1 where the scored tokens were evicted too, 0 where kept."""
        return {"evict_scored": float(self.scored == "evict")}

    def validate_prefix(self, n: int) -> None:
        if self.config.window >= n:
            raise bad_value("prefix_tokens", n, f"more tokens than the DMS window of "
                            f"{self.config.window} (nothing could be evicted)")

    @torch.inference_mode()
    def run_segment(self, model, prefix: torch.Tensor, cont: torch.Tensor, prefill=None) -> Segment:
        """Prefill ``prefix`` and score ``cont`` teacher-forced under hard DMS decisions (a dense
        ``prefill`` is of no use here: the gates decide during the prefill)."""
        gates = self.bind(model)
        n_kv = model.config.num_key_value_heads
        run = DMSRun(self.config, mode="hard", keep_from=len(prefix) if self.scored == "keep" else None,
                     gates=gates)
        with attention_state(AttentionState(dms=run)):
            out = model(prefix[None], use_cache=True)
            held = held_after(run, len(prefix), n_kv)
            logits = model(cont[None], past_key_values=out.past_key_values, use_cache=True).logits[0]
        total = len(prefix) * n_kv * len(held)
        kept = int(sum(h.sum().item() for h in held))
        return Segment(logits, kept / total, total / max(kept, 1), self.segment_details())

    @torch.inference_mode()
    def greedy(self, model, ids: torch.Tensor, max_new: int, eos: int | None = None, prefill=None,
               margins: list | None = None):
        """Greedy decoding on the reference DMS cache (tokens really dropped per head). ``margins``, if
        given, receives each step's gap between the top two logits (how close a tie it was)."""
        c = model.config
        run = DMSRun(self.config, mode="hard", gates=self.bind(model))
        cache = DMSCache(run, c.num_hidden_layers, c.num_key_value_heads)
        with attention_state(AttentionState(dms=run)):
            out = model(ids[None], past_key_values=cache, use_cache=True)
            held = int(cache.held().sum())

            def pick(logits):
                if margins is not None:
                    top = logits.float().topk(2).values
                    margins.append(float(top[0] - top[1]))
                return int(logits.argmax())

            tok = pick(out.logits[0, -1])
            toks = [tok]
            for _ in range(max_new - 1):
                if eos is not None and tok == eos:
                    break
                out = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
                tok = pick(out.logits[0, -1])
                toks.append(tok)
        total = len(ids) * c.num_key_value_heads * c.num_hidden_layers
        return toks, total / max(held, 1)
