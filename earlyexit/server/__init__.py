"""``earlyexit serve``: an HTTP server that answers with early exits and learns while it serves.

Needs the ``serve`` extra (``pip install 'earlyexit[serve]'``: FastAPI, uvicorn,
prometheus_client); nothing below this package imports it, so the core works without it.

Parts, one job each:

- :mod:`.decoding`: request bodies to checked batches, or a 4xx saying what was expected;
- :mod:`.backends`: what serves a batch (the online learner, with heads chosen on the first
  traffic or not, saved heads as they are, or the base model alone);
- :mod:`.batcher`: dynamic batching on the one serving thread;
- :mod:`.metrics`: the Prometheus metrics;
- :mod:`.app`: the FastAPI app (endpoints, token, shutdown save);
- :mod:`.launch`: uvicorn on a bound socket, the loopback rule, SIGTERM;
- :mod:`.endpoints`: what both HTTP front ends share (body limit, errors, token, ``/save`` body);
- :mod:`.scale_out`: the same endpoints on Ray Serve, N replicas and one learner (the ``ray``
  extra).

The backends, the batcher and the decoder import without the extra; :func:`create_app` and
:func:`run_server` load it on first use (a :class:`~earlyexit.MissingPackageError` naming the
install command when it is missing).

Example:
    >>> import earlyexit as ee
    >>> from earlyexit.server import LearnerBackend, ServerSettings, create_app  # doctest: +SKIP
    >>> learner = ee.OnlineDistiller(ee.wrap(model), ee.DistillConfig(background=True))  # doctest: +SKIP
    >>> app = create_app(LearnerBackend(learner), transform, ServerSettings(max_batch=32))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from .backends import (
    Backend,
    ChoosingBackend,
    FrozenBackend,
    LearnerBackend,
    NotAvailable,
    PlainBackend,
    ServedBatch,
)
from .batcher import DynamicBatcher, ServerClosing
from .decoding import RequestDecoder, RequestError

__all__ = [
    "Backend",
    "ChoosingBackend",
    "DynamicBatcher",
    "FrozenBackend",
    "LearnerBackend",
    "NotAvailable",
    "PlainBackend",
    "RequestDecoder",
    "RequestError",
    "ScaleOutSettings",
    "ServedBatch",
    "ServedModel",
    "ServerClosing",
    "ServerSettings",
    "bind_socket",
    "build_app",
    "check_host",
    "create_app",
    "run_server",
]

#: Names that need the ``serve`` extra, and the module that defines each.
_NEEDS_EXTRA = {
    "ServerSettings": "app",
    "create_app": "app",
    "bind_socket": "launch",
    "check_host": "launch",
    "run_server": "launch",
    "ScaleOutSettings": "scale_out",
    "ServedModel": "scale_out",
    "build_app": "scale_out",
}


def __getattr__(name: str) -> Any:
    # Loaded on first use, so that importing the package needs no HTTP packages.
    if name in _NEEDS_EXTRA:
        import importlib

        module = importlib.import_module(f"{__name__}.{_NEEDS_EXTRA[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
