"""The package's structure, drawn from its own imports with the standard library's ``ast``: no import cycle inside
``denseclip/`` (a lazy import inside a function counts), the configuration free of torch, no oversized module,
and a library that never reaches into the checkout's ``pipelines/``."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "denseclip"
MAX_LINES = 520  # "about 500": a module past this is several jobs in one room


def module_files(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> its file, for every module of ``package`` under ``root``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports anywhere in its file (top level or inside a function).
    ``from a.b import c`` is an arrow to ``a.b.c`` where that is a module, else to ``a.b``."""
    modules = module_files(root, package)
    graph = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                               for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for start, edges in graph.items():
        if start in index:
            continue
        work = [(start, iter(sorted(edges)))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_the_package_has_no_import_cycle():
    graph = import_graph(ROOT)
    assert len(graph) > 40 and graph["denseclip.predictor"] >= {"denseclip.models", "denseclip.dense"}
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    """A copy of the package with one cycle put back (config importing the predictor again, lazily, as
    ``LabelerConfig.build`` once did): the finder must name it."""
    for path in module_files(ROOT).values():
        copy = tmp_path / path.relative_to(ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    assert import_cycles(import_graph(tmp_path)) == []
    config = tmp_path / "denseclip" / "config.py"
    config.write_text(config.read_text() + "\n\ndef build():\n    from .predictor import DenseCLIP\n\n"
                      "    return DenseCLIP\n")
    [cycle] = import_cycles(import_graph(tmp_path))
    assert {"denseclip.config", "denseclip.predictor"} <= set(cycle)


def test_the_configuration_and_the_shared_names_load_no_torch():
    code = ("import sys, denseclip.config, denseclip.names, denseclip.vocabulary, denseclip.protocols; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'open_clip')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert not {"denseclip.models", "denseclip.predictor"} & import_graph(ROOT)["denseclip.config"]


def test_no_module_is_several_rooms_in_one():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in module_files(ROOT).items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_the_library_never_runs_the_checkouts_scripts():
    """An installed package has no ``pipelines/``: the library calls ``python -m denseclip <command>``, never a
    script path (a string ``pipelines/<name>.py`` in its code; prose may still name the scripts)."""
    offenders = {name: node.value for name, path in module_files(ROOT).items()
                 for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, ast.Constant) and isinstance(node.value, str)
                 and re.fullmatch(r"pipelines/\w+\.py", node.value)}
    assert offenders == {}
