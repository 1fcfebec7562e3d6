"""The shape of the package: an acyclic import graph (function-local imports counted), methods that
import no engine, harness, CLI or evaluation module, SGLang patched only through the patch helper,
an architecture page that names every module, and product text without development history."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "kvsqueeze"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(ROOT).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every kvsqueeze module ``name`` imports, anywhere in the file (function bodies too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            if node.level:
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):
                out.add(t)
    return out


def _graph():
    mods = _modules()
    return {m: _imports(m, f, mods) for m, f in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_is_acyclic_with_function_local_imports_counted():
    assert _cycles(_graph()) == []


FORBIDDEN_FOR_METHODS = ("kvsqueeze.backends", "kvsqueeze.harness", "kvsqueeze.cli", "kvsqueeze.evaluate")


def test_methods_import_no_engine_harness_cli_or_evaluation():
    graph = _graph()
    bad = [(m, t) for m, ts in graph.items() if m.startswith("kvsqueeze.methods") for t in ts
           if t.startswith(FORBIDDEN_FOR_METHODS)]
    assert bad == []
    # ... nor do they pull one in when imported (a fresh interpreter: every method module)
    code = ("import sys, importlib, pkgutil, kvsqueeze.methods as m\n"
            "for info in pkgutil.walk_packages(m.__path__, 'kvsqueeze.methods.'):\n"
            "    importlib.import_module(info.name)\n"
            f"bad = [n for n in sys.modules if n.startswith({FORBIDDEN_FOR_METHODS!r}) or n.split('.')[0] "
            "in ('sglang', 'tensorrt_llm', 'locust')]\n"
            "print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_registry_imports_a_method_only_when_asked_for():
    code = ("import sys\nfrom kvsqueeze.methods import get, names\n"
            "assert 'dms' in names() and 'kvtc' in names() and 'fusion' in names()\n"
            "get('window')\n"
            "print(sorted(n for n in sys.modules if n.startswith('kvsqueeze.methods.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = eval(out.stdout)
    assert "kvsqueeze.methods.eviction" in loaded
    assert not any(n.startswith(("kvsqueeze.methods.dms", "kvsqueeze.methods.kvtc", "kvsqueeze.methods.fusion"))
                   for n in loaded), loaded


def _sglang_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sglang"):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("sglang")}
    return names


def _root_name(node) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def test_sglang_symbols_are_replaced_only_through_the_patch_helper():
    """No assignment to an attribute (or item) of anything imported from SGLang, outside the helper."""
    offenders = []
    for f in sorted((PKG / "backends" / "sglang").glob("*.py")):
        if f.name == "patch.py":
            continue
        tree = ast.parse(f.read_text())
        sg = _sglang_names(tree)
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                if isinstance(t, (ast.Attribute, ast.Subscript)) and _root_name(t) in sg:
                    offenders.append(f"{f.name}:{node.lineno}")
    assert offenders == []


def test_the_architecture_page_names_every_module_and_stays_in_the_repository():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [str(f.relative_to(PKG)) for f in sorted(PKG.rglob("*.py"))
               if f.name != "__init__.py" and str(f.relative_to(PKG)) not in text]
    assert missing == []
    assert "../" not in text and "shared/" not in text


HISTORY = re.compile(r"\b(issues?|sessions?)\s*#?\d+", re.IGNORECASE)


def test_product_text_tells_no_development_history():
    """Code, docs, benchmarks, scripts and results/README.md never say "issue 4" or "session 7"."""
    files = [*PKG.rglob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md", ROOT / "results" / "README.md",
             *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "scripts").glob("*"), *(ROOT / "docker").glob("*")]
    hits = [f"{f.relative_to(ROOT)}:{i + 1}" for f in files if f.is_file()
            for i, line in enumerate(f.read_text(errors="replace").splitlines()) if HISTORY.search(line)]
    assert hits == []
