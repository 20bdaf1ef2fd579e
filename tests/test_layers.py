"""The import graph (stdlib ``ast``, every import, also those inside functions): the layers
go flows -> pipeline -> anl_core and never back, inside ``pipeline`` its floors (``FLOORS``)
likewise, and no two modules import each other, directly or around a loop."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("anl_core", "pipeline", "flows")
LAYER = {"anl_core": 0, "pipeline": 1, "flows": 2}  # a module may import its own layer or lower

# pipeline's floors, ground first: a module imports from its own floor or lower. Files on the
# ground need nothing of the pipeline; the work (data, models, ssl, generate, evaluate) knows
# no config, run store or stage; the config composes the work's settings; the run store
# keeps records; the report reads them; the stages bind config, work and store; sweeps and
# transfer run stages.
FLOORS = (
    ("pipeline", "pipeline.atomic", "pipeline.devices", "pipeline.digest", "pipeline.paths",
     "pipeline.stage_graph", "pipeline.validation"),
    ("pipeline.provenance",),
    ("pipeline.data",),
    ("pipeline.models",),
    ("pipeline.ssl",),
    ("pipeline.generate",),
    ("pipeline.evaluate",),
    ("pipeline.config", "pipeline.config_sections"),
    ("pipeline.runs", "pipeline.integrity", "pipeline.run_lock", "pipeline.preflight",
     "pipeline.estimate",
     "pipeline.init_preset"),
    ("pipeline.report",),
    ("pipeline.stages",),
    ("pipeline.sweep",),
    ("pipeline.transfer",),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that ``name`` is or lies in (``pipeline.ssl.arms.X`` ->
    ``pipeline.ssl.arms``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    known = {_module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        mod = _module_name(path)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y / from .. import z
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:
                target = _resolve(name, known)
                # A package's __init__ re-exporting its own modules is not a dependency
                # of those modules on it.
                if target and target != mod and not target.startswith(mod + "."):
                    deps.add(target)
        graph[mod] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walker_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "pipeline.ssl.trainer" in graph["pipeline.ssl.arms"]  # from .trainer import ...
    assert "anl_core.sampling" in graph["pipeline.generate.sample"]  # imported inside a function
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_layers_point_down_only():
    broken = sorted(f"{mod} -> {dep}" for mod, deps in import_graph().items() for dep in deps
                    if LAYER[dep.split(".")[0]] > LAYER[mod.split(".")[0]])
    assert not broken, "imports against the layers (flows -> pipeline -> anl_core):\n" + \
        "\n".join(broken)


def floor(module: str) -> int:
    """The floor of a pipeline module (its own entry, or its package's)."""
    for i, names in enumerate(FLOORS):
        if any(module == n or module.startswith(n + ".") for n in names if n != "pipeline") \
                or module == "pipeline" and "pipeline" in names:
            return i
    raise AssertionError(f"{module} is on no floor of tests/test_layers.py:FLOORS; add it")


def test_pipeline_floors_point_down_only():
    graph = {m: d for m, d in import_graph().items() if m.startswith("pipeline")}
    broken = sorted(f"{mod} (floor {floor(mod)}) -> {dep} (floor {floor(dep)})"
                    for mod, deps in graph.items() for dep in deps
                    if dep.startswith("pipeline") and floor(dep) > floor(mod))
    assert not broken, "imports running back up pipeline's floors:\n" + "\n".join(broken)


def test_the_floor_check_sees_an_import_inside_a_function():
    assert floor("pipeline.stages.tune") > floor("pipeline.generate.tune")
    assert floor("pipeline.data.shards") < floor("pipeline.models")
    assert "pipeline.data.splits" in import_graph()["pipeline.stages.split"]  # lazy import


def test_no_import_cycles():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_planted_bug_of_the_mutation_check_still_matches_the_code():
    """scripts/mutation_check.py plants each bug by exact text: when the code moves on, the
    mutant must move with it, or the check silently stops covering that line."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("mutation_check",
                                                  REPO / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # @dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    stale = [f"{m.name}: {m.path}" for m in module.MUTANTS
             if (REPO / m.path).read_text().count(m.old) != 1]
    assert not stale, "mutants whose text is not in the code exactly once: " + ", ".join(stale)
    assert all((REPO / t.split("::")[0]).is_file() for m in module.MUTANTS for t in m.tests)
