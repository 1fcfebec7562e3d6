"""Text for calibration and evaluation, taken from what is on disk (nothing is downloaded).

Default split, by source file (the two parts never share one):

* held-out: the Python documentation topics that ship with every CPython
  (``pydoc_data/topics.py``: English prose with code examples, ~750 kB);
* calibration: the docstrings of the standard library's modules (every ``*.py`` of the stdlib except
  ``pydoc_data``), plus the licence texts under ``/usr/share/common-licenses`` where they exist.
"""

from __future__ import annotations

import ast
import functools
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from kvsqueeze.errors import KvsqueezeError


@dataclass(frozen=True)
class Document:
    source: str
    text: str


def heldout_documents() -> list[Document]:
    from pydoc_data import topics  # stdlib

    src = str(Path(topics.__file__).resolve())
    return [Document(src, "\n\n".join(body for _, body in sorted(topics.topics.items())))]


def heldout_sources(max_chars: int = 1_500_000) -> dict[str, list[Document]]:
    """Held-out text of several kinds, for measuring how a learned method's behaviour depends on the
    text (none shares a file with the calibration text); only the sources present on this machine:

    * ``python-docs``: the Python documentation topics (:func:`heldout_documents`);
    * ``package-readmes``: the long descriptions (READMEs) of the installed Python distributions;
    * ``release-notes``: upstream ``NEWS`` and ``changelog`` files under ``/usr/share/doc``;
    * ``python-code``: the source code of the installed ``transformers`` package.

    Each source is capped at about ``max_chars`` characters, read in sorted order (deterministic for
    one environment).
    """
    import gzip
    from importlib import metadata

    out: dict[str, list[Document]] = {"python-docs": heldout_documents()}

    def capped(items):
        docs, total = [], 0
        for src, text in items:
            if total > max_chars:
                break
            if text and len(text) > 500:
                docs.append(Document(src, text))
                total += len(text)
        return docs

    def readmes():
        for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
            name = dist.metadata["Name"] or ""
            if name.lower() == "kvsqueeze":
                continue
            body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
            yield f"{name} README", str(body)

    def notes():
        doc = Path("/usr/share/doc")
        if not doc.is_dir():
            return
        for p in sorted(doc.glob("*/*.gz")):
            if p.name.startswith(("NEWS", "changelog.gz")) and not p.is_symlink():
                try:
                    yield str(p), gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace")
                except (OSError, EOFError):
                    continue

    def code():
        try:
            import transformers
        except ImportError:
            return
        root = Path(transformers.__file__).parent
        for p in sorted(root.rglob("*.py")):
            yield str(p), p.read_text(errors="replace")

    for name, items in (("package-readmes", readmes()), ("release-notes", notes()), ("python-code", code())):
        docs = capped(items)
        if docs:
            out[name] = docs
    return out


def calibration_documents(max_chars: int = 2_000_000) -> list[Document]:
    """The calibration text (see the module's docstring), up to about ``max_chars`` characters; read
    once per process (parsing every stdlib module takes seconds)."""
    return list(_calibration_documents(max_chars))


@functools.lru_cache(maxsize=4)
def _calibration_documents(max_chars: int) -> tuple[Document, ...]:
    docs: list[Document] = []
    lic = Path("/usr/share/common-licenses")
    if lic.is_dir():
        for p in sorted(lic.iterdir()):
            if p.is_file() and not p.is_symlink():
                docs.append(Document(str(p), p.read_text(errors="replace")))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = sum(len(d.text) for d in docs)
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib).parts
        if rel[0] in ("pydoc_data", "site-packages", "test", "idlelib", "lib2to3") or total > max_chars:
            continue
        try:
            tree = ast.parse(p.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        parts = [ast.get_docstring(n) for n in ast.walk(tree)
                 if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
        text = "\n\n".join(t for t in parts if t and len(t) > 200)
        if text:
            docs.append(Document(str(p), text))
            total += len(text)
    return tuple(docs)


def read_text_files(paths: list[str]) -> list[Document]:
    docs = []
    for p in paths:
        path = Path(p)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KvsqueezeError(f"--text={p!r}: no such file; expected a readable UTF-8 text file")
        except (OSError, UnicodeDecodeError) as exc:
            raise KvsqueezeError(f"--text={p!r}: cannot be read ({exc}); expected a readable "
                                 "UTF-8 text file") from exc
        docs.append(Document(str(path), text))
    return docs


def token_segments(docs: list[Document], tokenizer, length: int, n_segments: int,
                   what: str = "text") -> list[tuple[str, list[int]]]:
    """Up to ``n_segments`` non-overlapping windows of ``length`` tokens, spread over the documents.

    Windows never span two documents; documents are tokenized separately and windows are taken
    evenly across all the places where one fits, so the choice is deterministic.
    """
    slots: list[tuple[str, list[int], int]] = []
    longest = 0
    for doc in docs:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        longest = max(longest, len(ids))
        for start in range(0, len(ids) - length + 1, length):
            slots.append((doc.source, ids, start))
    if not slots:
        raise KvsqueezeError(
            f"prefix_tokens + scored_tokens + 1 = {length} tokens are needed per segment, but the "
            f"longest {what} has {longest} tokens; expected a shorter --prefix-tokens/--scored-tokens "
            "or a longer text"
        )
    n = min(n_segments, len(slots))
    picks = [slots[(i * len(slots)) // n] for i in range(n)]
    return [(src, ids[s:s + length]) for src, ids, s in picks]


PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")


def passkey_text(key: int, before: int, after: int) -> str:
    """The pass-key retrieval prompt: ``before`` and ``after`` repetitions of filler around the
    needle, the question at the end (shared by ``kvsqueeze eval --task passkey`` and the harness)."""
    return ("There is an important pass key hidden inside a lot of irrelevant text. Find it and "
            "memorize it. I will quiz you about the pass key.\n" + PASSKEY_FILLER * before
            + f" The pass key is {key}. Remember it. {key} is the pass key. "
            + PASSKEY_FILLER * after + "\nWhat is the pass key? The pass key is")
