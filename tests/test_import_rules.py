"""The import rules each package states, checked: its "May import" line, private names, cycles.

Every package of autobatch/ and launcher/ opens with a docstring whose rule line reads

    May import: autobatch.errors, autobatch.planning; never: ray, launcher.

(a note in parentheses is allowed after an entry; "never" is optional). A module may
import its own package, what the line allows (a name and everything under it) and any
third-party or standard module the "never" part does not name. Imports are read with
`ast`, at module and at function level; a block under `if TYPE_CHECKING:` never runs
and is skipped. `from autobatch import X` counts as the module that X loads
(`autobatch._EXPORTS`). A private name (`_x`) imported from another package fails too.

Import cycles are looked for module by module, among the same imports: a cycle closed
by an import inside a function (one module dispatching to another that builds on it)
still ties the two into one concept, it only defers the error; TYPE_CHECKING imports
make none.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

import autobatch

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("autobatch", "launcher")
RULE = re.compile(r"^May import:(?P<may>[^;]*?)(?:;\s*never:(?P<never>.*?))?\.$", re.S)


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # the module the statement loads (a project module resolved to its file)
    names: tuple[str, ...]  # the names taken from it (`from m import a, b`), else ()


@dataclass(frozen=True)
class Rule:
    may: tuple[str, ...]
    never: tuple[str, ...]


# ---------------------------------------------------------------------------
# the project's modules and what they import


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The package a module belongs to (a package's __init__ belongs to itself)."""
    path = ROOT.joinpath(*module.split("."))
    return module if path.is_dir() else module.rpartition(".")[0]


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for top in PROJECT for p in sorted((ROOT / top).rglob("*.py"))}


def packages() -> list[str]:
    return sorted({package_of(m) for m in project_modules()})


def resolve(module: str, name: str | None = None) -> str:
    """The project module an import loads: `from a.b import c` loads a.b.c when c is a
    submodule; `from autobatch import X` the module X is exported from."""
    if module == "autobatch" and name in autobatch._EXPORTS:
        return autobatch._EXPORTS[name]
    if name is not None and _is_module(f"{module}.{name}"):
        return f"{module}.{name}"
    return module


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(source: str, module: str) -> list[Import]:
    """Every import statement of `source` (the text of `module`), at any level; what runs
    only under a type checker (`if TYPE_CHECKING:`) is skipped."""
    package = package_of(module)
    found: list[Import] = []

    def visit(nodes: Iterable[ast.AST]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
            elif isinstance(node, ast.Import):
                found.extend(Import(node.lineno, a.name, ()) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                found.extend(_from_import(node, package))
            else:
                visit(ast.iter_child_nodes(node))

    visit(ast.parse(source).body)
    return found


def _from_import(node: ast.ImportFrom, package: str) -> list[Import]:
    """One entry per module the statement loads (`from a import b, c`: a.b and a.c when
    they are submodules, else a with the names b and c)."""
    base = _absolute(node, package)
    by_module: dict[str, list[str]] = {}
    for alias in node.names:
        target = resolve(base, alias.name) if _in_project(base) else base
        by_module.setdefault(target, []).extend([alias.name] * (target == base))
    return [Import(node.lineno, m, tuple(names)) for m, names in by_module.items()]


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _in_project(module: str) -> bool:
    return module.split(".")[0] in PROJECT


# ---------------------------------------------------------------------------
# the rules


def parse_rule(docstring: str) -> Rule | None:
    """The "May import: ...; never: ...." line of a package's docstring (it may wrap)."""
    lines = docstring.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("May import:")), None)
    if start is None:
        return None
    text = ""
    for line in lines[start:]:
        text = f"{text} {line.strip()}".strip()
        if text.endswith("."):
            break
    match = RULE.match(text)
    if match is None:
        return None
    return Rule(_entries(match["may"]), _entries(match["never"] or ""))


def _entries(text: str) -> tuple[str, ...]:
    without_notes = re.sub(r"\([^)]*\)", "", text)
    return tuple(e.strip() for e in without_notes.split(",") if e.strip())


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(module: str, imports: list[Import], rule: Rule) -> list[str]:
    """What in `imports` (of `module`) breaks `rule`, one line each, naming all three."""
    own = package_of(module)
    out = []
    for imp in imports:
        where = f"{module}:{imp.line} imports {imp.module}"
        banned = next((n for n in rule.never if _under(imp.module, n)), None)
        if banned is not None:
            out.append(f"{where}: {own} never imports {banned}")
            continue
        if not _in_project(imp.module) or package_of(imp.module) == own:
            continue
        if not any(_under(imp.module, m) for m in rule.may):
            out.append(f"{where}: {own} may import only {', '.join(rule.may)}")
        private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        private += [p for p in imp.module.split(".") if p.startswith("_")]
        if private:
            out.append(f"{where}: {', '.join(private)} is private to {package_of(imp.module)}")
    return out


def rule_of(package: str) -> Rule | None:
    init = ROOT.joinpath(*package.split("."), "__init__.py")
    return parse_rule(ast.get_docstring(ast.parse(init.read_text())) or "")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1 or v in graph.get(v, ()):
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_path(graph, set(g)) for g in groups]


def _cycle_path(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest way round the group from its first module back to it."""
    start = min(group)
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph.get(v, ()) & group):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    raise AssertionError(f"no way round {sorted(group)}")


def load_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        loaded = {i.module for i in imports_of(path.read_text(), name)}
        graph[name] = {m for m in loaded if m in modules and m != name}
    return graph


# ---------------------------------------------------------------------------
# the project


def test_every_package_states_its_rule():
    missing = [p for p in packages() if rule_of(p) is None]
    assert missing == [], "no 'May import: ...; never: ....' line in their docstring"


@pytest.mark.parametrize("package", packages())
def test_the_package_imports_only_what_its_rule_allows(package):
    rule = rule_of(package)
    assert rule is not None
    found = []
    for name, path in project_modules().items():
        if package_of(name) == package:
            found += violations(name, imports_of(path.read_text(), name), rule)
    assert found == [], "\n".join(found)


def test_the_library_never_imports_ray_or_the_launcher():
    for package in packages():
        if package.split(".")[0] == "autobatch":
            assert {"ray", "launcher"} <= set(rule_of(package).never), package


def test_no_import_cycle_between_the_projects_modules():
    cycles = [" -> ".join(c) for c in find_cycles(load_graph())]
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


# ---------------------------------------------------------------------------
# the checker itself, on made-up modules

PROBE_RULE = Rule(may=("autobatch.errors", "autobatch.tasks.task"), never=("ray", "launcher"))


@pytest.mark.parametrize(
    ("source", "broken"),
    [
        # the package itself, what the rule allows, third-party modules: fine
        ("from autobatch.probe.peak import peak_at\nimport torch", None),
        ("from autobatch.errors import ProbeError", None),
        ("from autobatch.tasks.task import Task", None),
        # a private name of one's own package: fine
        ("from autobatch.probe.peak import _helper", None),
        # a package the rule does not list, at module or at function level
        ("from autobatch.step.wrap import Replicated", "may import only"),
        ("def f():\n    from autobatch.tasks.lora import LoraSpec", "may import only"),
        # a private name of another package, even one the rule allows
        ("from autobatch.tasks.task import _fingerprint", "is private to autobatch.tasks"),
        # what the rule forbids, however it is imported
        ("import ray", "never imports ray"),
        ("from launcher.job import spec", "never imports launcher"),
        ("def f():\n    import ray.util", "never imports ray"),
        # a type-only import never runs
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ray", None),
        # the public names count as the module they load
        ("from autobatch import Accumulator", "autobatch.step.accumulate"),
    ],
)
def test_the_checker_flags_what_breaks_a_rule(source, broken):
    found = violations(
        "autobatch.probe.fake", imports_of(source, "autobatch.probe.fake"), PROBE_RULE
    )
    if broken is None:
        assert found == []
    else:
        assert len(found) == 1 and broken in found[0], found


@pytest.mark.parametrize(
    ("docstring", "rule"),
    [
        (
            "x\n\nMay import: a.b, c (a note); never: ray, d.e.\n",
            Rule(("a.b", "c"), ("ray", "d.e")),
        ),
        ("May import: a,\nb; never: c.\n", Rule(("a", "b"), ("c",))),  # wrapped
        ("May import: a, b.\n", Rule(("a", "b"), ())),  # nothing forbidden
        ("May import a and b.\n", None),  # not the parseable phrasing
    ],
)
def test_rule_lines_parse(docstring, rule):
    assert parse_rule(docstring) == rule


def test_cycles_are_found_with_their_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_type_only_imports_are_skipped_and_function_level_ones_counted():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import x\nelse:\n    import z\n"
        "def f():\n    import y\n"
    )
    found = [i.module for i in imports_of(source, "autobatch.fake")]
    assert found == ["typing", "z", "y"]
