"""The shape of the code (docs/architecture.md): no import circle in the library or the bench,
function-local imports included; the library never imports ``stages`` or ``bench``; no stage imports
another; the store never imports the feature kinds; modules and functions stay small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY_LINES, STAGE_LINES, FUNCTION_LINES = 400, 150, 80
LONG_STAGES = {"cli.py", "run_pipeline.py"}  # the CLI's option table and the whole-chain runner
CONFIG_LITERALS = {("surpipe/tiny/sd.py", "tiny_sd_configs")}  # declarative configs, not logic


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("surpipe", "stages", "bench"):
        for p in sorted((REPO / top).rglob("*.py")):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _targets(mod: str, path: Path, node: ast.AST, mods: dict[str, Path]) -> list[str]:
    """The project modules an import statement names (``from pkg import sub`` names ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:  # relative: resolve against this module's package
            base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
            base = base[:len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
    out = []
    for n in names:
        if mod.startswith("bench") and n in {m.split(".", 1)[1] for m in mods if m.startswith("bench.")}:
            n = f"bench.{n}"  # the bench's scripts import each other by bare name
        while n and n not in mods:
            n = n.rpartition(".")[0]
        if n and n != mod:
            out.append(n)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (function-local imports too)."""
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[mod] = {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                      for t in _targets(mod, path, node, mods)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_library_or_the_bench():
    graph = import_graph()
    found = [c for c in cycles(graph) if any(m.startswith(("surpipe", "bench")) for m in c)]
    assert not found, f"import circles: {found}"


def test_the_library_never_imports_stages_or_bench_and_no_stage_imports_another():
    graph = import_graph()
    bad = sorted((m, t) for m, ts in graph.items() if m.startswith("surpipe") for t in ts
                 if t.startswith(("stages", "bench")))
    assert not bad, bad
    orchestrators = {"stages", "stages.cli", "stages.__main__", "stages.run_pipeline"}
    crossing = sorted((m, t) for m, ts in graph.items() if m.startswith("stages.") and m not in orchestrators
                      for t in ts if t.startswith("stages.") and t != m)
    assert not crossing, crossing


def test_the_store_never_imports_the_feature_kinds():
    """The kinds build on the store (array specs, groups); the store runs their checks when handed
    ``surpipe.features.RULES``, so it must not reach for them itself."""
    graph = import_graph()
    bad = sorted((m, t) for m, ts in graph.items() if m.startswith("surpipe.store") for t in ts
                 if t.startswith("surpipe.features"))
    assert not bad, bad
    from surpipe import features, store
    assert tuple(features.KINDS) == store.KINDS  # one folder per kind, each with its contract


def _sizes():
    for path in sorted(list((REPO / "surpipe").rglob("*.py")) + list((REPO / "stages").glob("*.py"))):
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text(encoding="utf-8")
        funcs = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(text))
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        yield rel, len(text.splitlines()), funcs


def test_modules_and_functions_stay_readable():
    too_long = []
    for rel, lines, funcs in _sizes():
        stage = rel.startswith("stages/")
        limit = None if stage and Path(rel).name in LONG_STAGES else STAGE_LINES if stage else LIBRARY_LINES
        if limit and lines > limit:
            too_long.append(f"{rel}: {lines} lines (at most {limit})")
        too_long += [f"{rel}: {name}() {n} lines (at most {FUNCTION_LINES})" for name, n in funcs
                     if n > FUNCTION_LINES and (rel, name) not in CONFIG_LITERALS]
    assert not too_long, "\n".join(too_long)


@pytest.mark.parametrize("source, expect", [
    ("from surpipe.store import core\n", {"surpipe.store.core"}),
    ("def f():\n    from surpipe.train import recipe\n", {"surpipe.train.recipe"}),
    ("import surpipe.store.lease as L\n", {"surpipe.store.lease"}),
])
def test_function_local_and_submodule_imports_are_counted(tmp_path, source, expect):
    mods = _modules()
    node_targets = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            node_targets |= set(_targets("surpipe.x", REPO / "surpipe" / "x.py", node, mods))
    assert node_targets == expect
