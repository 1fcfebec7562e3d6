"""SGLang general plugin (entry point group ``sglang.srt.plugins``, name ``kvsqueeze``).

SGLang calls :func:`load` early in the launcher, scheduler and detokenizer processes, so everything
kvsqueeze needs inside SGLang is installed from here, in every process, without editing SGLang.
Restrict SGLang to this plugin with ``SGLANG_PLUGINS=kvsqueeze``.
"""

from __future__ import annotations


def load() -> None:
    from kvsqueeze.backends.sglang import cpu_shims, dms, fusion, validation

    cpu_shims.apply_all()
    validation.install()  # every server: requests that would take it down get a 400
    fusion.install()  # only when KVSQUEEZE_FUSION is set (kvsqueeze serve --method fusion)
    dms.install()  # only when KVSQUEEZE_DMS is set (a DMS checkpoint; --attention-backend dms)
