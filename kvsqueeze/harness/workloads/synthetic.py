"""``random``: prompts of a drawn length cut from held-out prose, max tokens of a drawn length.

``input`` and ``output`` are length distributions (:class:`~kvsqueeze.harness.workloads.Lengths`:
``256``, ``128..512`` or ``256+-64`` tokens). Each prompt is a window of that many tokens of the
held-out text (Python's documentation topics, never used for calibration) at a random place, decoded
to text; re-encoded it may differ by a token or two, so ``prompt_tokens`` is the re-encoded count.
Windows start at random places of ~190k tokens, so prompts share no prefix beyond chance. SGLang's
``--dataset-name random`` draws token ids instead (text a model never sees); vLLM's draws lengths
from ``[len * (1 - range_ratio), len * (1 + range_ratio)]``, the uniform case here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from kvsqueeze.errors import bad_value
from kvsqueeze.harness.workloads import Conversation, Lengths, Turn, Workload, WorkloadContext


@functools.lru_cache(maxsize=2)
def _prose_ids(tokenizer) -> tuple[int, ...]:
    from kvsqueeze.corpus import heldout_documents

    return tuple(tokenizer.encode(heldout_documents()[0].text, add_special_tokens=False))


@dataclass(frozen=True)
class Synthetic(Workload):
    name = "random"
    input: Lengths = Lengths("fixed", 256)
    output: Lengths = Lengths("fixed", 64)

    def conversations(self, count: int, ctx: WorkloadContext) -> list[Conversation]:
        if self.input.upper + self.output.upper > ctx.context_tokens:
            raise bad_value("workload random", f"input={self.input},output={self.output}",
                            f"lengths whose sum stays within the context ({ctx.context_tokens} tokens)")
        ids = _prose_ids(ctx.tokenizer)
        rng = ctx.rng("random")
        out = []
        for i in range(count):
            n = min(self.input.sample(rng), len(ids) - 1)
            at = rng.randrange(0, len(ids) - n)
            text = ctx.tokenizer.decode(list(ids[at:at + n]))
            out.append(Conversation(f"random-{i}", (Turn(text, self.output.sample(rng), None, None,
                                                         ctx.count(text)),)))
        return out
