"""The package's modules import each other in one direction: from the weight
math and the twins at the bottom to the installer, the hooks and the CLI at
the top. Every import counts, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moefuse_runtime"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(name: str) -> str | None:
    """``name`` if it is a module or package of ours, else None."""
    path = PACKAGE.parent / name.replace(".", "/")
    if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
        return name
    return None


def imports_of(path: Path) -> set[str]:
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("moefuse_runtime")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("moefuse_runtime"):
                continue
            for alias in node.names:
                found.add(resolve(f"{target}.{alias.name}") or target)
    found.discard(here)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, if there is any."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt, [*path, nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_modules_import_without_a_loop():
    edges = graph()
    assert "moefuse_runtime.installer" in edges["moefuse_runtime.hooks"]  # the walk sees lazy ones
    assert cycle(edges) is None, " -> ".join(cycle(edges) or [])


def test_the_finder_finds_a_loop():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_lower_modules_never_reach_up():
    edges = graph()
    top = {"moefuse_runtime.installer", "moefuse_runtime.hooks", "moefuse_runtime.cli"}
    for low in (
        "layer",
        "halves",
        "projections",
        "twins",
        "walk",
        "first_forward",
        "blocks",
        "dense",
        "config",
        "memory",
        "report",
    ):
        assert not edges[f"moefuse_runtime.{low}"] & top, low
