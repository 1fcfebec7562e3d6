"""kvsqueeze: KV-cache compression for LLM serving stacks (DMS, KVTC, joint block encoding)."""

__version__ = "0.1.0"

# The registry's torchvision (pulled in by timm for SGLang) fails to import beside the CPU torch;
# transformers imports it lazily. Declaring its two missing op schemas first keeps every
# `import transformers` after `import kvsqueeze` working (kvsqueeze/compat.py).
from kvsqueeze.compat import apply_pre_import as _apply_pre_import

_apply_pre_import()
