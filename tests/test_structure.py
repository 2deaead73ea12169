"""The package's shape: imports go one way (no cycles, lower layers never import higher ones), private names
stay in their module, and no source file grows past what one reader holds in their head.

The import graph is read from the source with `ast` (every import, including those inside functions), so
a lazy import that hides a cycle from Python is still caught.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
MAX_LINES = 400

# Layers, lowest first: a module may import its own layer and the layers below. `llavakit` itself (the
# package's public facade) and command-line modules (`*.cli`, which wire everything together) are exempt.
LAYERS = {"data": 0, "model": 1, "interop": 2, "train": 3, "infer": 3, "eval": 4, "demo": 5, "smoke": 5}


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for f in (SRC / "llavakit").rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


def _absolute(module: str | None, importer: str, is_pkg: bool, level: int) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")[: None if is_pkg else -1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(mods) -> dict[str, set[tuple[str, str | None]]]:
    """module -> {(imported llavakit module, imported name or None)} over every import statement."""
    out: dict[str, set] = {m: set() for m in mods}
    for m, (f, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node.module, m, is_pkg, node.level)
                found = [(f"{base}.{a.name}", None) if f"{base}.{a.name}" in mods else (base, a.name)
                         for a in node.names]
            else:
                continue
            for target, name in found:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != m:
                    out[m].add((target, name))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def imports():
    return _imports(_modules())


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycle(imports):
    graph = {m: {t for t, _ in targets} for m, targets in imports.items()}
    assert _cycles(graph) == []


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[-1] == "cli":
        return None
    return LAYERS.get(parts[1])


def test_lower_layers_never_import_higher_ones(imports):
    assert set(LAYERS) >= {p.name for p in (SRC / "llavakit").iterdir() if p.is_dir() and p.name != "__pycache__"}
    upward = [f"{m} imports {t}" for m, targets in imports.items() for t, _ in targets
              if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)]
    assert upward == []


def test_model_imports_nothing_from_interop(imports):
    assert [t for m, ts in imports.items() if m.startswith("llavakit.model") for t, _ in ts
            if t.startswith("llavakit.interop")] == []


def test_private_names_stay_in_their_module(imports):
    crossing = [f"{m} imports {t}.{name}" for m, targets in imports.items() for t, name in targets
                if name and name.startswith("_") and not name.startswith("__")]
    assert crossing == []


def test_benchmarks_use_only_public_names():
    crossing = []
    for f in BENCH.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llavakit"):
                crossing += [f"{f.name}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert crossing == []


def test_no_source_file_is_over_the_limit():
    long = [f"{f.relative_to(f.parents[2] if f.is_relative_to(SRC) else BENCH.parent)}: {n} lines"
            for f in [*(SRC / "llavakit").rglob("*.py"), *BENCH.glob("*.py")]
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert long == []
