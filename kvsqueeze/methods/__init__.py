"""Engine-agnostic KV-cache compression methods: the interface and registry (``base``), the baselines
(one module each: ``dense``, ``eviction``, ``quant``) and one package per method family (``dms``,
``kvtc``, ``fusion``). Methods are imported when first asked for (:func:`get`, :func:`create`)."""

from kvsqueeze.methods.base import (  # noqa: F401
    CompressedPrefix,
    CompressionMethod,
    MethodSpec,
    PrefixCache,
    Segment,
    Unsupported,
    available,
    create,
    create_spec,
    get,
    names,
    parse_spec,
    register,
)
