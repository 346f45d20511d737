"""No import cycles among `pipeline` modules, counting imports inside functions: a lazy import hides a cycle from
Python's import machinery, not from the design (a module that needs its own importer is one layer, not two)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import pipeline

ROOT = Path(pipeline.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    """Every module of the package, with an edge for each `pipeline` module it imports anywhere in its file."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from . import x`, `from .x import y`
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                # `from pipeline import tasks` imports the module pipeline.tasks; `from pipeline.x import f` pipeline.x
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import pipeline.serving.app` -> that module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph.add_edge(name, target)
    return graph


def test_the_graph_sees_lazy_and_package_imports():
    """The parser is what the cycle check stands on: it must see an import inside a function (stages imports
    eval_report only in print_summary) and `from pipeline.run import x` as the module x."""
    graph = import_graph()
    assert graph.has_edge("pipeline.run.runner", "pipeline.stages.eval_report")
    assert graph.has_edge("pipeline.run.runner", "pipeline.run.tracking")  # `from pipeline.run import tracking`, in a function
    assert "pipeline" not in graph.successors("pipeline.run.runner")


def test_no_import_cycles():
    graph = import_graph()
    found = []
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1:
            cycle = [a for a, _ in nx.find_cycle(graph.subgraph(component))]
            found.append(f"{' -> '.join([*cycle, cycle[0]])}  (all of {sorted(component)} reach each other)")
    assert not found, "import cycles among pipeline modules:\n" + "\n".join(found)
