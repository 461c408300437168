"""The HTTP layer of ``earlyexit serve``: a FastAPI app over a backend, a batcher and metrics.

Endpoints:

- ``POST /predict``: one image (``image/png``, ``image/jpeg``) or a preprocessed float32 batch
  (``application/x-npy``, ``[B, C, H, W]``); answers ``{"predictions": [{"label", "probability",
  "exit", "accepted"}, ...], "heads_version", "num_exits"}``.
- ``GET /healthz``: ``{"status": "ok"}`` (a 503 with the reason once the learner's thread has
  failed, since every request then fails).
- ``GET /stats``: the learner's ``stats()`` plus ``heads_version``, ``requests``, ``batches``.
- ``GET /metrics``: Prometheus text (:mod:`.metrics`).
- ``POST /save`` (body optional: ``{"path": "heads.safetensors"}``, default the save-on-exit path)
  and ``POST /calibrate``: change the server's state, so they need ``Authorization: Bearer TOKEN``
  when the server has a token.

Every refusal is a 4xx with ``{"error": "..."}`` saying what was expected; a bad request is
refused before it joins a batch (:mod:`.decoding`), so it never fails other requests and never
reaches the learner. The model runs only on the batcher's thread (:mod:`.batcher`); decoding runs
in the thread pool; the event loop only moves bytes. On shutdown (the app's lifespan ends, e.g.
after SIGTERM once uvicorn has finished the requests in flight) the queued work is served, the
learner's thread stops, and the heads and thresholds are saved to ``save_on_exit``.

Example:
    >>> from fastapi.testclient import TestClient  # doctest: +SKIP
    >>> app = create_app(LearnerBackend(learner), transform, ServerSettings(max_batch=16))  # doctest: +SKIP
    >>> with TestClient(app) as client:  # doctest: +SKIP
    ...     client.post("/predict", content=png, headers={"Content-Type": "image/png"}).json()
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .._optional import import_extra_package
from ..errors import ConfigError
from .backends import Backend, NotAvailable, ServedBatch
from .batcher import DynamicBatcher, ServerClosing
from .decoding import DEFAULT_MAX_PIXELS, NPY_TYPE, RequestDecoder, RequestError, media_type
from .endpoints import authorize, json_error, predict_answer, read_body, save_path_of
from .metrics import ServerMetrics

fastapi = import_extra_package("fastapi", "earlyexit serve", "serve")
responses = import_extra_package("fastapi.responses", "earlyexit serve", "serve")
concurrency = import_extra_package("starlette.concurrency", "earlyexit serve", "serve")
starlette_exceptions = import_extra_package("starlette.exceptions", "earlyexit serve", "serve")

# Names FastAPI reads from the endpoints' annotations.
Request = fastapi.Request
Response = fastapi.Response
JSONResponse = responses.JSONResponse

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_QUEUED_REQUESTS",
    "ServerSettings",
    "ServerState",
    "create_app",
]

#: Largest request body accepted by default (8 MiB: a few large photos' worth).
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
#: Requests that may wait for the serving thread by default before new ones get a 503.
DEFAULT_MAX_QUEUED_REQUESTS = 256
#: ``.npy`` bodies up to this size are decoded on the event loop (a copy and a check); larger
#: ones, and every image (decoding and resizing cost milliseconds), in the thread pool.
INLINE_DECODE_BYTES = 256 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """How the server batches, what it accepts, and who may change its state.

    Attributes:
        max_batch: most samples served together.
        max_wait_ms: longest a request waits for others to join its batch (0: served as soon as
            the serving thread is free; requests that arrive meanwhile are batched together).
        max_queued_requests: requests waiting for the serving thread beyond which a new one gets
            a 503 at once (back-pressure: an overloaded server answers fast instead of letting
            every request's latency grow without bound).
        max_body_bytes: larger request bodies get a 413.
        max_pixels: larger images get a 400 before they are decoded.
        token: when set, ``/save`` and ``/calibrate`` need ``Authorization: Bearer TOKEN``.
        save_on_exit: where the heads and thresholds are saved when the server stops (and where
            ``/save`` writes when no path is given).
        learner_state: where the whole learner is saved when the server stops
            (:meth:`~earlyexit.OnlineDistiller.save`: evidence, replay and counters too, so a
            restarted server resumes with its gates open; ``earlyexit serve --learner-state``).
    """

    max_batch: int = 32
    max_wait_ms: float = 0.0
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    token: str | None = None
    save_on_exit: str | None = None
    learner_state: str | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {self.max_batch}")
        if not self.max_wait_ms >= 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queued_requests < 1:
            raise ConfigError(
                f"max_queued_requests must be at least 1, got {self.max_queued_requests}"
            )
        if self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes must be at least 1, got {self.max_body_bytes}")
        if self.token is not None and not self.token:
            raise ConfigError("token must not be empty (leave it unset for no token)")


class ServerState:
    """What one app holds: backend, batcher, metrics and counters (``app.state.server``)."""

    def __init__(
        self, backend: Backend, transform: Callable[[Any], Tensor], settings: ServerSettings
    ):
        self.backend = backend
        self.settings = settings
        self.decoder = RequestDecoder(
            transform, backend.input_size, dtype=backend.dtype, max_pixels=settings.max_pixels
        )
        self.metrics = ServerMetrics(backend.num_exits)
        self.batcher = DynamicBatcher(
            backend.serve,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000.0,
            on_batch=lambda served, _seconds: self.metrics.record_batch(served),
        )
        #: ``/predict`` requests received (any outcome).
        self.requests = 0
        #: Where the heads were saved on shutdown (``None``: not asked to, or it failed).
        self.saved_to: str | None = None
        #: Where the learner was saved on shutdown (``None``: not asked to, or it failed).
        self.learner_saved_to: str | None = None
        #: Why a save on shutdown failed (``None``: none did).
        self.shutdown_error: str | None = None

    def stats(self) -> dict[str, Any]:
        """The backend's stats plus ``heads_version``, ``requests`` and ``batches``."""
        stats = dict(self.backend.stats())
        stats.update(
            heads_version=self.backend.heads_version(),
            requests=self.requests,
            batches=self.batcher.batches,
        )
        return stats

    def shut_down(self) -> None:
        """Serve what is queued, stop the learner's thread, then save the heads to
        ``save_on_exit`` and the learner to ``learner_state`` (each where asked)."""
        self.batcher.close()
        self.backend.close()
        if self.settings.save_on_exit is not None:
            self.saved_to = self._save("the heads", self.settings.save_on_exit, self.backend.save)
        if self.settings.learner_state is not None:
            self.learner_saved_to = self._save(
                "the learner", self.settings.learner_state, self.backend.save_learner
            )

    def _save(self, what: str, path: str, save: Callable[[str], None]) -> str | None:
        """``save(path)``; the path, or ``None`` where there was nothing to save or it failed
        (then ``shutdown_error`` says why, also on stderr)."""
        try:
            save(path)
        except NotAvailable:
            return None  # --plain: nothing to save
        except Exception as err:
            error = f"could not save {what} to {path}: {type(err).__name__}: {err}"
            if self.shutdown_error is None:  # the first failure is the one reported
                self.shutdown_error = error
            print(f"earlyexit serve: error: {error}", file=sys.stderr, flush=True)
            return None
        return str(path)


def create_app(
    backend: Backend,
    transform: Callable[[Any], Tensor],
    settings: ServerSettings | None = None,
) -> Any:
    """The FastAPI app serving ``backend`` (see the module docstring for the endpoints).

    Args:
        backend: a :class:`~earlyexit.server.LearnerBackend` (learns while it serves) or a
            :class:`~earlyexit.server.PlainBackend` (the base model alone).
        transform: the model's preprocessing of one PIL image
            (:func:`earlyexit.data.model_transform`), as ``earlyexit run`` uses it.
        settings: batching, limits, token and save path (:class:`ServerSettings`).

    The batcher's thread starts with the app's lifespan (``with TestClient(app)``, or uvicorn) and
    stops with it, saving to ``settings.save_on_exit``.

    Example:
        >>> app = create_app(LearnerBackend(learner), transform)  # doctest: +SKIP
    """
    settings = settings or ServerSettings()
    state = ServerState(backend, transform, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        state.batcher.start()
        try:
            yield
        finally:
            await concurrency.run_in_threadpool(state.shut_down)

    app = fastapi.FastAPI(
        title="earlyexit",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = state

    @app.exception_handler(starlette_exceptions.HTTPException)
    async def http_error(_request: Request, exc: Any) -> Response:
        # Unknown paths and methods answer in the same {"error": ...} shape as everything else.
        return json_error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        arrived = time.perf_counter()
        state.requests += 1
        try:
            content_type = request.headers.get("content-type")
            state.decoder.check_content_type(content_type)
            if state.batcher.queued >= settings.max_queued_requests:
                state.metrics.record_request(503)
                return json_error(
                    503,
                    f"the server is overloaded ({state.batcher.queued} requests waiting); "
                    "retry later",
                    {"Retry-After": "1"},
                )
            body = await read_body(request, settings.max_body_bytes)
            if media_type(content_type) == NPY_TYPE and len(body) <= INLINE_DECODE_BYTES:
                # A small .npy is one copy and a finiteness check (tens of microseconds): a hop
                # to the thread pool and back would cost more than it saves the event loop.
                x = state.decoder.decode(content_type, body)
            else:
                x = await concurrency.run_in_threadpool(state.decoder.decode, content_type, body)
            served: ServedBatch = await asyncio.wrap_future(state.batcher.submit(x))
        except RequestError as err:
            state.metrics.record_request(err.status)
            return json_error(err.status, err.message)
        except ServerClosing:
            state.metrics.record_request(503)
            return json_error(503, "the server is shutting down; retry on another replica or later")
        except Exception as err:  # the model or the learner failed: not the client's fault
            state.metrics.record_request(500)
            return json_error(500, f"serving failed ({type(err).__name__}: {err})")
        state.metrics.record_request(200, time.perf_counter() - arrived)
        return predict_answer(served, backend.num_exits)

    @app.get("/healthz")
    async def healthz() -> Response:
        failure = backend.failure()
        if failure is not None:  # every request would fail: take this server out of rotation
            return JSONResponse({"status": "failing", "error": failure}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/stats")
    def stats() -> Response:  # a plain def: FastAPI runs it in the thread pool
        return JSONResponse(state.stats())

    @app.get("/metrics")
    def metrics() -> Response:
        body, content_type = state.metrics.render(backend.stats(), backend.heads_version())
        return Response(content=body, media_type=content_type)

    async def on_serving_thread(fn: Callable[[], Any]) -> Any:
        try:
            return await asyncio.wrap_future(state.batcher.call(fn))
        except NotAvailable as err:
            return json_error(409, str(err))
        except ServerClosing:
            return json_error(503, "the server is shutting down")

    @app.post("/save")
    async def save(request: Request) -> Response:
        refused = authorize(request, settings.token)
        if refused is not None:
            return refused
        try:
            path = await save_path_of(request, settings.save_on_exit)
        except RequestError as err:
            return json_error(err.status, err.message)

        def write() -> Response:
            try:
                backend.save(path)
            except ConfigError as err:  # a folder, an empty path
                return json_error(400, str(err))
            except OSError as err:
                return json_error(500, f"could not write {path}: {err}")
            return JSONResponse({"saved": path, "heads_version": backend.heads_version()})

        return await on_serving_thread(write)

    @app.post("/calibrate")
    async def calibrate(request: Request) -> Response:
        refused = authorize(request, settings.token)
        if refused is not None:
            return refused

        def run() -> Response:
            backend.calibrate()
            return JSONResponse(state.stats())

        return await on_serving_thread(run)

    return app
