"""Joint encoding of KV-cache blocks (arXiv 2601.03067): fuse similar blocks into one shared block.
The engine-agnostic part, from the bottom up:

- ``config``: the one set of defaults and validators, the decision layers, :class:`FusionConfig`;
- ``similarity``: block and per-token key similarity (the Triton Gram kernel in ``kernels``);
- ``grouping``: grouping by recursive binary split and fusing a group into one block;
- ``refs``: reference counts of shared pages;
- ``online``: the online whole-page decisions a serving engine runs after each prefill;
- ``batch``: BFF across the requests of a batch, for evaluation;
- ``method``: the ``fusion`` method of ``kvsqueeze eval`` (CFF within one prefix).

docs/fusion.md describes the method and its measurements.
"""
