"""Compatibility shims that must run before ``transformers`` (or SGLang) is first imported.

``torchvision_ops``: the registry's torchvision wheel (pulled in by ``timm``, which SGLang and
transformers import for vision models kvsqueeze never loads) is built against a CUDA torch; beside the
CPU torch its import fails with ``operator torchvision::nms does not exist``, because its fake-tensor
registrations refer to ops its C++ library never registered here. Declaring the two op schemas makes
the import succeed. The ops are declared, never implemented: calling them raises. Where torchvision's
compiled ops load (a matching build), nothing is declared: an early declaration would then abort the
process (seen on a GPU machine).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_TORCHVISION_LIB = None  # keeps the torch.library.Library alive for the life of the process
_applied: set[str] = set()


def _torchvision_needs_shim() -> bool:
    """Whether torchvision's compiled ops cannot load beside this torch (the registry's torchvision
    beside the CPU torch): then its Python side needs the op schemas declared. Loading its library is
    what ``import torchvision`` does first; where that works (a matching GPU build), no shim."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    libs = sorted(Path(spec.submodule_search_locations[0]).glob("_C*.so"))
    if libs:
        try:
            torch.ops.load_library(str(libs[0]))
        except (OSError, RuntimeError):
            pass
    try:
        return not torch._C._dispatch_has_kernel_for_dispatch_key("torchvision::nms", "CPU")
    except RuntimeError:  # op unknown to the dispatcher: the C++ part never loaded
        return True


def torchvision_ops() -> None:
    """Declare ``torchvision::nms`` / ``torchvision::qnms`` so ``import torchvision`` succeeds."""
    global _TORCHVISION_LIB
    if "torchvision_ops" in _applied:
        return
    _applied.add("torchvision_ops")
    import sys

    if "torchvision" in sys.modules or not _torchvision_needs_shim():
        return
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        try:
            lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already defined (a CPU torchvision that works)
            pass
    _TORCHVISION_LIB = lib
    logger.debug("kvsqueeze: declared torchvision::nms/qnms schemas for the CPU torch")


def apply_pre_import() -> None:
    """Shims that must run before sglang or transformers are imported."""
    torchvision_ops()
