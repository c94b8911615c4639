"""The house's arrows run one way: every `lmforge` import (module level, inside functions, and under
TYPE_CHECKING alike) goes from a higher layer to a lower or the same one, and no modules import each other
in a circle. The layers, lowest first, are the shape of ../shared/DESIGN.md made checkable."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# module prefix -> layer (the longest prefix that matches decides)
LAYERS = {
    # helpers that know no recipe: folders lmforge writes, generation on plain transformers models, the
    # runtime (devices, precision, threads, ranks, status files, metric logs)
    "lmforge.outputs": 0, "lmforge.generation": 0, "lmforge.engine.runtime": 0, "lmforge.engine.distributed": 0,
    "lmforge.engine.status": 0, "lmforge.engine.metrics": 0,
    "lmforge.data": 1,  # data knows tokenizers, not models
    "lmforge.config": 2,  # the schema: imports nothing above data types
    # the parts a stage is composed of
    "lmforge.models": 3, "lmforge.methods": 3, "lmforge.objectives": 3, "lmforge.rewards": 3,
    "lmforge.engine.optimizer": 3, "lmforge.engine.checkpoint": 3, "lmforge.engine.tracking": 3,
    "lmforge.engine.rollout": 3,  # where RL objectives get their batches
    # a recipe resolved and its stage assembled: the loop, data sources and rollouts, evaluation, run keys
    "lmforge.recipe_files": 4, "lmforge.run_keys": 4, "lmforge.stage_inputs": 4, "lmforge.pipeline_types": 4,
    "lmforge.engine.loop": 4, "lmforge.sources": 4, "lmforge.eval": 4,
    # one stage run, its pre-launch check, export
    "lmforge.pipeline": 5, "lmforge.check": 5, "lmforge.export": 5,
    "lmforge.pipeline_recipe": 5,  # a pipeline recipe read into stage instances
    "lmforge.lifecycle": 6,  # pipelines of stages planned, checked and run
    # what users meet
    "lmforge.serve": 7, "lmforge.chat": 7, "lmforge.board": 7, "lmforge.recipe_reference": 7, "lmforge.cli": 8,
    "lmforge": 0,  # the package's __init__
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "lmforge").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported lmforge module: line}."""
    mods = _modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != module and not module.startswith(target + "."):
                    graph[module].setdefault(target, node.lineno)
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_every_import_points_down_or_across():
    upward = [f"{m}:{line} imports {t} (layer {_layer(m)} -> {_layer(t)})"
              for m, targets in import_graph().items() for t, line in targets.items() if _layer(t) > _layer(m)]
    assert upward == []


def test_the_schema_imports_only_data_types():
    graph = import_graph()
    schema = [m for m in graph if m == "lmforge.config" or m.startswith("lmforge.config.")]
    assert len(schema) > 1  # the schema's files, one concern each
    for module in schema:
        outside = {t for t in graph[module] if not t.startswith("lmforge.config")}
        assert outside <= {"lmforge.data.chat_templates"}, module


def test_the_checks_can_fail():
    """A circle and an upward import are found where there is one."""
    assert circles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert _layer("lmforge.data.prepare") < _layer("lmforge.config") < _layer("lmforge.cli")
    assert all(_layer(m) is not None for m in _modules())
