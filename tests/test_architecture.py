"""The package's shape: dependencies point one way (no import cycle, function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "charlstm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The charlstm modules a module imports anywhere in its body (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("charlstm")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("charlstm"):
                target = node.module
            else:
                continue
            submodules = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
            found |= submodules
            if len(submodules) < len(node.names):    # names defined by the module itself
                found.add(target)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph (as a list of modules, first = last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    known = {"charlstm", "charlstm.native", "charlstm.native.abi", "charlstm.model", "charlstm.errors"}
    src = tmp_path / "step.py"
    src.write_text("from .abi import Kernel\nfrom .. import errors\n\ndef f():\n    from ..model import State\n")
    assert imports_of("charlstm.native.step", src, known) == {"charlstm.native.abi", "charlstm.errors",
                                                              "charlstm.model"}


COMMANDS = ("charlstm.train", "charlstm.sample", "charlstm.evaluate", "charlstm.info", "charlstm.bench",
            "charlstm.plot", "charlstm.cache", "charlstm.compare", "charlstm.visualize")


def _package(name: str) -> str:
    return next((c for c in COMMANDS if name == c or name.startswith(c + ".")), name)


def test_the_cli_is_the_only_module_that_imports_the_commands():
    """Commands (what cli.py calls) are imported by nothing below them: no command borrows from another
    (compare-variants trains through training.py, the library, not through the train command)."""
    graph = import_graph()
    for name, deps in graph.items():
        if name in ("charlstm.cli", "charlstm.__main__"):
            continue
        borrowed = sorted(d for d in deps if _package(d) in COMMANDS and _package(d) != _package(name))
        assert not borrowed, f"{name} imports the command module(s) {borrowed}"
