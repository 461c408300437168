"""The top-level namespace: every exported name exists, ``__all__`` stays sorted, the version is
the installed one, and every error class earlyexit defines is exported."""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import re

import earlyexit as ee


def _isort_key(name: str) -> tuple[int, list[object]]:
    """ruff RUF022's order: SCREAMING_CASE, then CamelCase, then the rest; natural order inside."""
    if name.isupper() or (name.upper() == name and "_" in name):
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    parts = [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
    return group, parts


def test_every_name_in_all_exists():
    missing = [name for name in ee.__all__ if not hasattr(ee, name)]
    assert not missing
    assert len(set(ee.__all__)) == len(ee.__all__)


def test_all_is_sorted():
    assert list(ee.__all__) == sorted(ee.__all__, key=_isort_key)


def test_what_the_docs_send_users_to_is_exported():
    for name in (
        "gate_names",
        "head_kinds",
        "register_gate",
        "register_head",
        "register_adapter",
        "calibrate_thresholds",
        "calibrate_joint",
        "calibrate_risk_control",
        "BackboneAdapter",
        "FeatureLayout",
    ):
        assert name in ee.__all__, name


def test_version_comes_from_the_package_metadata():
    assert ee.__version__ == importlib.metadata.version("earlyexit")


def test_every_error_class_lives_in_errors_and_is_exported():
    for info in pkgutil.walk_packages(ee.__path__, prefix="earlyexit."):
        if info.name.endswith("__main__"):  # runs the command line when imported
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:  # an optional dependency that is not installed
            continue

    def subclasses(cls: type) -> list[type]:
        return [s for sub in cls.__subclasses__() for s in (sub, *subclasses(sub))]

    errors = {
        cls for cls in subclasses(ee.EarlyExitError) if cls.__module__.startswith("earlyexit")
    }
    assert {cls.__name__ for cls in errors} >= {"ConfigError", "ShippedFileError"}
    for cls in errors:
        assert getattr(ee, cls.__name__) is cls, cls.__name__
        assert cls.__name__ in ee.__all__, cls.__name__
        assert cls.__module__ == "earlyexit.errors", f"{cls.__name__} in {cls.__module__}"
