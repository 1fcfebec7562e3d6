"""DMS: Dynamic Memory Sparsification (arXiv 2506.05345), the engine-agnostic part.

A learned binary decision per token and KV head (or per layer): evict or keep, delayed through a
sliding window. Modules, from the bottom up:

- ``config``: :class:`~kvsqueeze.methods.dms.config.DMSConfig` and file names;
- ``rule``: the rule itself (gate logit, shift by one, sinks, what a query sees, what is held, which
  slot a new token takes), called by everything below and by every engine adapter;
- ``gates``: the gate parameters and the hooks that compute their logits in a Hugging Face model;
- ``checkpoint``: kvsqueeze and released (Model-Optimizer) checkpoints, the shipped gates;
- ``run``: :class:`~kvsqueeze.methods.dms.run.DMSRun`, the per-forward state (hard decisions or the
  relaxed training ones) and the attention mask it gives;
- ``cache``: the reference inference cache (tokens really dropped per head);
- ``pages``: per-(sequence, layer, KV head) pages of a serving pool where eviction frees memory;
- ``train`` / ``warmstart``: retrofit training by self-distillation and its optional warm start;
- ``method``: the ``dms`` method of ``kvsqueeze eval``;
- ``offset``: fitting an offset of the gate logits to a target ratio on a user's own text.

Nothing here imports an engine; docs/dms.md describes the method and its measurements.
"""
