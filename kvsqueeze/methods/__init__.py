"""Engine-agnostic KV-cache compression methods. Importing this package registers the built-ins."""

from kvsqueeze.methods import dense, dms, eviction, fusion, kvtc, quant  # noqa: F401  (registration side effects)
from kvsqueeze.methods.base import (  # noqa: F401
    CompressedPrefix,
    CompressionMethod,
    PrefixCache,
    available,
    create,
    get,
    register,
)
