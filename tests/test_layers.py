"""Dependencies point down: each room imports only the rooms below it (see ARCHITECTURE.md), so
the core never imports measurement or the CLI.

Every ``import`` in the package, at module level or inside a function, is parsed and resolved to
the earlyexit module it names; an import from a lower room into a higher one fails the test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import earlyexit

PACKAGE_ROOT = Path(earlyexit.__file__).parent

#: The rooms of ARCHITECTURE.md, bottom to top: a module may import its own room and the rooms
#: below it. Keys are module names or package prefixes.
ROOMS: dict[str, int] = {
    # errors and small utilities
    "earlyexit.errors": 0,
    "earlyexit._registry": 0,
    "earlyexit._json": 0,
    "earlyexit._threads": 0,
    "earlyexit._optional": 0,
    "earlyexit._checks": 0,
    "earlyexit.routing": 1,
    "earlyexit.io": 1,
    "earlyexit.backbones": 2,
    "earlyexit.heads": 2,
    "earlyexit.gates": 3,
    "earlyexit.supervisors": 3,
    "earlyexit.calibration": 3,
    "earlyexit.costs": 4,
    "earlyexit.results": 5,
    "earlyexit.exit_hooks": 5,
    "earlyexit.model": 5,
    "earlyexit.head_timing": 5,
    "earlyexit.wrapping": 6,
    "earlyexit.loading": 6,
    "earlyexit.distill": 7,
    "earlyexit.cascade": 8,
    "earlyexit.cartography": 8,
    "earlyexit.data": 8,
    "earlyexit.evaluation": 9,  # measurement
    "earlyexit.server": 9,  # the HTTP server, beside measurement (neither imports the other)
    "earlyexit._cli": 10,
    "earlyexit.cli": 10,
    "earlyexit.__main__": 10,
    "earlyexit": 10,  # the namespace re-exports everything, measurement included
}
#: Calls that go sideways inside a function to break a module-level cycle (see ARCHITECTURE.md):
#: none today; name any you add here and there.
SIDEWAYS: set[tuple[str, str]] = set()


def room_of(module: str) -> int:
    """The room of a module: the longest key of ROOMS that is the module or a package above it."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        if key in ROOMS:
            return ROOMS[key]
    raise AssertionError(f"{module} is in no room: add it to ROOMS and to ARCHITECTURE.md")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(module: str) -> bool:
    return (PACKAGE_ROOT.parent / module.replace(".", "/") / "__init__.py").exists()


def imported_modules(source: str, module: str, package: bool) -> list[tuple[int, str]]:
    """(line, earlyexit module) for every import of the package in ``source``."""
    found: list[tuple[int, str]] = []
    base = module.split(".") if package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("earlyexit")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("earlyexit"):
                continue
            for alias in node.names:
                # ``from pkg import sub`` imports the submodule when there is one, else the
                # package's own namespace.
                candidate = f"{target}.{alias.name}"
                sub = (PACKAGE_ROOT.parent / candidate.replace(".", "/")).with_suffix(".py")
                if sub.exists() or is_package(candidate):
                    found.append((node.lineno, candidate))
                else:
                    found.append((node.lineno, target))
    return found


#: Packages that share a room but must not import each other.
APART = (("earlyexit.server", "earlyexit.evaluation"),)


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def wrong_way_imports(source: str, module: str, package: bool) -> list[str]:
    here = room_of(module)
    problems = []
    for line, target in imported_modules(source, module, package):
        there = room_of(target)
        if there > here and (module, target) not in SIDEWAYS:
            problems.append(f"{module}:{line} (room {here}) imports {target} (room {there})")
        for a, b in APART:
            if (_inside(module, a) and _inside(target, b)) or (
                _inside(module, b) and _inside(target, a)
            ):
                problems.append(f"{module}:{line} imports {target}: {a} and {b} stay apart")
    return problems


def test_no_module_imports_a_room_above_its_own():
    problems = []
    files = sorted(PACKAGE_ROOT.rglob("*.py"))
    assert len(files) > 40  # the walk really found the package
    for path in files:
        module = module_name(path)
        problems += wrong_way_imports(
            path.read_text(encoding="utf-8"), module, path.name == "__init__.py"
        )
    assert not problems, "imports that point up:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("from .evaluation.macs import MacCounter", "earlyexit.model"),
        ("def f():\n    from ..evaluation import plot", "earlyexit.distill.learner"),
        ("from . import evaluation", "earlyexit.wrapping"),
        ("from .. import __version__", "earlyexit.gates.base"),
        ("from .model import EarlyExitModel", "earlyexit.routing"),
        ("from ..distill import OnlineDistiller", "earlyexit.costs.placement"),
        ("from .wrapping import wrap", "earlyexit.model"),
        ("from .wrapping import wrap", "earlyexit.io"),
        ("def f():\n    from .loading import load", "earlyexit.model"),
        ("from ..evaluation.stream import iterate_batches", "earlyexit.server.app"),
        ("from ..server import create_app", "earlyexit.evaluation.pipeline"),
        ("import earlyexit._cli.common", "earlyexit.calibration"),
        ("from .._cli.common import table", "earlyexit.evaluation.pipeline"),
    ],
)
def test_the_check_catches_a_wrong_way_import(source, module):
    assert wrong_way_imports(source, module, package=False)


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("from ..costs.macs import count_macs", "earlyexit.evaluation.breakdown"),
        ("from .routing import simulate_exits", "earlyexit.calibration"),
        ("from ..evaluation.pipeline import serve_and_evaluate", "earlyexit._cli.demo"),
        ("from . import evaluation", "earlyexit"),
        ("from ..routing import leaves", "earlyexit.cascade.policy"),
        ("from .scores import CONFIDENCE_SCORES", "earlyexit.gates.base"),
    ],
)
def test_the_check_allows_imports_that_point_down(source, module):
    assert not wrong_way_imports(source, module, package=module == "earlyexit")
