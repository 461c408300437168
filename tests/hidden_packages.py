"""Python source that makes a fresh interpreter see some packages as not installed.

Every finder on ``sys.meta_path`` is wrapped so that it does not find them, which is what an
environment without them looks like (``importlib.util.find_spec`` returns ``None``, ``import``
raises ``ModuleNotFoundError``). A finder that raised ``ImportError`` instead would not do: torch
probes for optional libraries with ``find_spec`` and only expects ``None``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable


def hiding_prelude(hidden: Iterable[str]) -> str:
    """The first lines of a child script (``python -c``): after them ``hidden`` (top-level package
    names, with their submodules) cannot be imported, and ``HIDDEN`` names them."""
    return textwrap.dedent(
        """
        import importlib, sys

        HIDDEN = {hidden!r}


        class NotInstalled:
            # Wraps a finder so that the hidden packages (and their submodules) are never found.

            def __init__(self, inner):
                self.inner = inner

            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in HIDDEN:
                    return None
                return self.inner.find_spec(name, path, target)

            def __getattr__(self, attr):
                return getattr(self.inner, attr)


        sys.meta_path[:] = [NotInstalled(finder) for finder in sys.meta_path]
        """
    ).format(hidden=tuple(hidden))
