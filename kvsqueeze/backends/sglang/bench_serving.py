"""``python -m kvsqueeze.backends.sglang.bench_serving <args>``: SGLang's own benchmark client
(``python -m sglang.bench_serving``, the same arguments) in the project's environment.

Plain ``python -m sglang.bench_serving`` fails there at import (``operator torchvision::nms does not
exist``: the registry's torchvision beside the CPU torch, imported through transformers); this runs
kvsqueeze's torchvision shim first and then SGLang's own client, unchanged. For example, against a
server started with ``kvsqueeze serve``::

    python -m kvsqueeze.backends.sglang.bench_serving --backend sglang --base-url http://127.0.0.1:30000 \\
        --dataset-name random --random-input-len 256 --random-output-len 64 --num-prompts 16 \\
        --tokenizer "$(kvsqueeze model)"
"""

from __future__ import annotations

from kvsqueeze import compat

compat.apply_pre_import()


def main(argv: list[str] | None = None) -> None:
    import sys

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    from sglang.benchmark.serving import cli_main

    cli_main()


if __name__ == "__main__":
    main()
