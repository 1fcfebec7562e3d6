"""``python -m kvsqueeze.backends.sglang.launch <sglang server args>``: SGLang's launcher with the CPU shims.

It is SGLang's own ``launch_server`` path; the only difference is that the torchvision shim runs before
sglang (and through it transformers) is imported. SGLang's scheduler and detokenizer are spawned and
re-import this module as ``__mp_main__``, so the shim runs there too; everything else is applied by the
kvsqueeze plugin that SGLang loads in every process.
"""

from __future__ import annotations

from kvsqueeze import compat

compat.apply_pre_import()


def main(argv: list[str] | None = None) -> None:
    import os
    import sys

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(sys.argv[1:] if argv is None else argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
