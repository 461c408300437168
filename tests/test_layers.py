"""Dependencies point down: the core never imports measurement or the CLI (see ARCHITECTURE.md).

Every ``import`` in the package, at module level or inside a function, is parsed and resolved to
the earlyexit module it names; an import from a lower room into a higher one fails the test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import earlyexit

PACKAGE_ROOT = Path(earlyexit.__file__).parent

#: Rooms from the bottom up; a module may import its own room and the rooms below it. The
#: top-level namespace (the facade) re-exports measurement too, so only the top may import it.
CORE, MEASUREMENT, CLI, FACADE = "core", "measurement", "cli", "facade"
RANK = {CORE: 0, MEASUREMENT: 1, CLI: 2, FACADE: 2}


def room_of(module: str) -> str:
    """Which room a module of the package belongs to."""
    parts = module.split(".")
    if module == "earlyexit":
        return FACADE  # the namespace re-exports everything, evaluation included
    if parts[1] in ("_cli", "cli", "__main__"):
        return CLI
    if parts[1] == "evaluation":
        return MEASUREMENT
    return CORE


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


def wrong_way_imports(source: str, module: str, package: bool) -> list[str]:
    here = room_of(module)
    problems = []
    for line, target in imported_modules(source, module, package):
        there = room_of(target)
        if RANK[there] > RANK[here]:
            problems.append(f"{module}:{line} ({here}) imports {target} ({there})")
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
    ],
)
def test_the_check_allows_imports_that_point_down(source, module):
    assert not wrong_way_imports(source, module, package=module == "earlyexit")
