"""The import structure of fx_lntune: no cycles, no import up the layer order, no hidden function-level imports.

The graph is read from the source with `ast` (module-level and function-level imports alike), so a loop that a
lazy import hides is caught too. Importing a submodule runs its package's ``__init__`` as well; those implicit
edges are not counted (a package ``__init__`` is placed on its own floor below).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fx_lntune

ROOT = Path(fx_lntune.__file__).parent

# The floors, lowest first: a module may import its own floor or lower ones, never a higher one. A module sits on
# the floor of the longest prefix listed here that names it.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base: errors, configuration, state, dispatch modules, module paths",
        (
            "fx_lntune.errors",
            "fx_lntune.compat",
            "fx_lntune.files",
            "fx_lntune.config",
            "fx_lntune.dispatch",
            "fx_lntune.modules",
            "fx_lntune.meta_device",
            "fx_lntune.graph_inputs",
            "fx_lntune.state",
            "fx_lntune.materialize",
            "fx_lntune.routing",
        ),
    ),
    ("graph helpers and the pass runner", ("fx_lntune.passes._graphs", "fx_lntune.passes._runner")),
    ("passes", ("fx_lntune.passes",)),
    ("capture: front-ends, layer discovery, example inputs", ("fx_lntune.capture", "fx_lntune.inputs")),
    (
        "verbs: transform, adapters, layer graphs, generation",
        (
            "fx_lntune.adapters",
            "fx_lntune.api",
            "fx_lntune.layer_graphs",
            "fx_lntune.generation",
            "fx_lntune.static_decode",
        ),
    ),
    (
        "outputs: persistence, Trainer checkpoints, deploy, visualize",
        ("fx_lntune.persistence", "fx_lntune.trainer", "fx_lntune.deploy", "fx_lntune.visualize"),
    ),
    ("front: the package, the graph's PEFT methods, the CLI", ("fx_lntune.cli", "fx_lntune.methods", "fx_lntune")),
]

# Function-level imports of our own modules allowed (module -> imported module), each needing a comment in the
# source saying which heavy optional dependency makes it lazy. None today.
LAZY_ALLOWED: frozenset[tuple[str, str]] = frozenset()


def floor_of(module: str, floors: list[tuple[str, tuple[str, ...]]] = FLOORS) -> int:
    best, level = -1, None
    for index, (_, prefixes) in enumerate(floors):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    if level is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS in tests/test_layering.py")
    return level


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
    """``({module: modules of ours it imports}, {(module, imported) for imports inside a function or class})``."""
    files = {_module_name(path, root): path for path in root.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    nested: set[tuple[str, str]] = set()
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        top_level = {id(node) for node in tree.body}
        found: set[str] = set()
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    name = f"{base}.{alias.name}"
                    targets.append(name if name in files else base)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                if target in files and target != module:
                    found.add(target)
                    if id(node) not in top_level:
                        nested.add((module, target))
        edges[module] = found
    return edges, nested


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``edges`` as ``[a, b, ..., a]``, or ``None``."""
    done: set[str] = set()
    for start in sorted(edges):
        stack, on_path = [(start, iter(sorted(edges[start])))], [start]
        if start in done:
            continue
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.pop()
                done.add(node)
            elif child in on_path:
                return [*on_path[on_path.index(child) :], child]
            elif child not in done:
                stack.append((child, iter(sorted(edges.get(child, ())))))
                on_path.append(child)
    return None


def upward_imports(edges: dict[str, set[str]], floors=FLOORS) -> list[str]:
    return [
        f"{module} ({floors[floor_of(module, floors)][0]}) imports {target} ({floors[floor_of(target, floors)][0]})"
        for module, targets in sorted(edges.items())
        for target in sorted(targets)
        if floor_of(target, floors) > floor_of(module, floors)
    ]


def test_no_import_cycle():
    edges, _ = import_graph()
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_no_upward_import():
    edges, _ = import_graph()
    assert upward_imports(edges) == []


def test_no_hidden_function_level_imports():
    _, nested = import_graph()
    assert sorted(nested - LAZY_ALLOWED) == []


def test_every_module_has_a_floor():
    edges, _ = import_graph()
    assert len(edges) > 30 and "fx_lntune.passes._graphs" in edges
    for module in edges:
        floor_of(module)


def test_the_checks_can_fail(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    floors = [("low", ("x.low",)), ("high", ("x.high",))]
    assert upward_imports({"x.low": {"x.high"}, "x.high": set()}, floors) == ["x.low (low) imports x.high (high)"]
    assert upward_imports({"x.high": {"x.low"}, "x.low": set()}, floors) == []
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg import b\n")
    (package / "b.py").write_text("from pkg.a import f\n")
    edges, nested = import_graph(package)
    assert find_cycle(edges) == ["pkg.a", "pkg.b", "pkg.a"] and nested == {("pkg.a", "pkg.b")}
    with pytest.raises(AssertionError, match="on no floor"):
        floor_of("elsewhere.module")
