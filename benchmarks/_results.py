"""Writing a benchmark's results: ``OUT.json`` (what a script reads) and ``OUT.md`` (what a person
reads), the directory made if missing."""

from __future__ import annotations

import json
from pathlib import Path


def write(out: str | Path, payload: dict, lines: list[str]) -> Path:
    """Write ``payload`` to ``out.json`` and ``lines`` to ``out.md``; returns the markdown path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    md = out.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    print(f"wrote {md}")
    return md
