"""KVTC: KV Cache Transform Coding (arXiv 2511.01815), the engine-agnostic part.

- ``codec``: the model-free codec (RoPE removal, PCA transform, DP bit allocation, clipped
  quantizers, range coding, checksummed blobs) and the :class:`~kvsqueeze.methods.kvtc.codec.Calibration`;
- ``calibrate``: fitting a calibration on text, and finding or making the one a model runs with;
- ``prefix``: a prefix cache through the codec (exempt tokens exact, bytes counted);
- ``store``: the compressed page store behind the storage tiers (SGLang HiCache, TensorRT-LLM's
  connector);
- ``method``: the ``kvtc`` method of ``kvsqueeze eval``.

docs/kvtc.md describes the method and its measurements.
"""
