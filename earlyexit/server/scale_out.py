"""Scale-out on Ray Serve: N replicas serve the wrapped model, one learner learns from all of them.

The deployment graph (:func:`build_app`):

- ``EarlyExitReplica`` (``replicas`` copies, the HTTP ingress): each serves ``/predict`` with
  ``@serve.batch`` through a :class:`~earlyexit.distill.ServingReplica`, sends every batch's
  teacher signals (the head inputs and final logits of the samples that ran to the end, and the
  audit outcomes: features, never images) to the learner, and installs the learner's newest
  :class:`~earlyexit.distill.HeadsRelease` between two batches, whole (heads, gate and thresholds
  of one version: no batch is served with a mix). It follows the learner every ``poll_s``.
- ``EarlyExitLearner`` (one): an :class:`~earlyexit.OnlineDistiller` in background mode fed by
  :meth:`~earlyexit.OnlineDistiller.record`; it trains, calibrates and releases versioned heads,
  and knows which version each live replica serves.

The endpoints are those of ``earlyexit serve`` (:mod:`.app`), through Ray's HTTP proxy:
``/predict`` (answers also name the ``replica``), ``/healthz``, ``/stats`` (the learner's stats,
``replicas``: the heads version each live replica serves, and this replica's counters),
``/metrics`` (this replica's counters, the learner's gauges), ``/save`` and ``/calibrate`` (to
the learner; token as for the embedded server). Requests beyond ``max_queued_requests`` per
replica get Ray's 503 (back-pressure) instead of queueing without bound.

A replica that dies is restarted by Ray Serve; it installs the learner's latest release before
it takes a request. A batch in flight on the dead replica fails (the proxy answers 500); nothing
hangs. Needs the ``ray`` extra (``pip install 'earlyexit[ray]'``); nothing else imports this.

Example:
    >>> import ray
    >>> from ray import serve
    >>> from earlyexit.server.scale_out import ScaleOutSettings, ServedModel, build_app
    >>> served = ServedModel(wrap=make_wrapped_model, transform=transform)  # doctest: +SKIP
    >>> serve.run(build_app(served, ScaleOutSettings(replicas=2)), name="earlyexit")  # doctest: +SKIP
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations from the
# deployment classes, which Ray serialises without this module's namespace.

import asyncio
import copy
import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._json import json_safe
from .._optional import import_extra_package
from ..distill import DistillConfig, HeadsRelease, OnlineDistiller, ServingReplica
from ..errors import ConfigError
from ..model import EarlyExitModel
from .app import DEFAULT_MAX_BODY_BYTES
from .backends import ServedBatch, answers
from .decoding import DEFAULT_MAX_PIXELS, RequestDecoder, RequestError
from .endpoints import authorize, json_error, predict_answer, read_body, save_path_of
from .metrics import ServerMetrics

serve = import_extra_package("ray.serve", "earlyexit serve --ray", "ray")
fastapi = import_extra_package("fastapi", "earlyexit serve --ray", "ray")
responses = import_extra_package("fastapi.responses", "earlyexit serve --ray", "ray")

Request = fastapi.Request  # read by FastAPI from the endpoints' annotations
Response = fastapi.Response
JSONResponse = responses.JSONResponse

__all__ = ["APP_NAME", "ScaleOutSettings", "ServedModel", "build_app", "learner_handle"]

#: The Serve application name used by ``earlyexit serve --ray``.
APP_NAME = "earlyexit"
#: A replica not heard from for this long is no longer listed in ``/stats``.
REPLICA_SILENCE_S = 10.0


@dataclass(frozen=True)
class ServedModel:
    """How every process of the app builds the same wrapped model (pickled to each of them).

    Attributes:
        wrap: returns the wrapped model, in eval mode, with the same base weights, exits and head
            kinds every time it is called (heads may differ: the learner's release replaces them).
            Must be picklable: a module-level function or a ``functools.partial`` of one.
        transform: the model's preprocessing of one PIL image (for PNG/JPEG bodies), or ``None``
            to take preprocessed ``.npy`` batches only.
        config: the learner's :class:`~earlyexit.DistillConfig` (it runs in background mode).
        threads: torch CPU threads of each replica (``None``: torch's default).
    """

    wrap: Callable[[], EarlyExitModel]
    transform: Callable[[Any], Tensor] | None = None
    config: DistillConfig = field(default_factory=DistillConfig)
    threads: int | None = None

    @classmethod
    def of(
        cls,
        eem: EarlyExitModel,
        transform: Callable[[Any], Tensor] | None = None,
        config: DistillConfig | None = None,
        threads: int | None = None,
    ) -> "ServedModel":
        """Serve copies of ``eem`` (base weights, exits, heads and thresholds): it travels to
        every process with the app, and each makes its own copy.

        Example:
            >>> served = ServedModel.of(ee.wrap(model), transform)  # doctest: +SKIP
        """
        if not isinstance(eem, EarlyExitModel):
            raise ConfigError(
                f"expected an EarlyExitModel (ee.wrap(model)), got {type(eem).__name__}"
            )
        return cls(
            wrap=functools.partial(copy.deepcopy, eem),
            transform=transform,
            config=config or DistillConfig(),
            threads=threads,
        )


@dataclass(frozen=True)
class ScaleOutSettings:
    """How many replicas, how they batch, what they accept, who may change state.

    Attributes:
        replicas: serving replicas (each a Ray actor holding one copy of the model).
        max_batch: most samples one replica serves together (``@serve.batch``).
        max_wait_ms: longest a request waits for others to join its batch.
        max_queued_requests: requests waiting for a replica beyond which new ones get a 503.
        max_body_bytes, max_pixels, token: as for the embedded server (:class:`.ServerSettings`).
        replica_cpus, learner_cpus: Ray CPUs reserved for each replica and for the learner.
        poll_s: how often a replica asks the learner for a newer release.
        max_unsent_batches: teacher signals a replica keeps while the learner is busy; beyond
            that the oldest are dropped (counted in ``signals_dropped``) rather than pile up.
    """

    replicas: int = 2
    max_batch: int = 32
    max_wait_ms: float = 0.0
    max_queued_requests: int = 256
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    token: str | None = None
    replica_cpus: float = 1.0
    learner_cpus: float = 0.0
    poll_s: float = 0.25
    max_unsent_batches: int = 64

    def __post_init__(self) -> None:
        checks = {
            "replicas": self.replicas >= 1,
            "max_batch": self.max_batch >= 1,
            "max_wait_ms": self.max_wait_ms >= 0,
            "max_queued_requests": self.max_queued_requests >= 1,
            "max_body_bytes": self.max_body_bytes >= 1,
            "replica_cpus": self.replica_cpus >= 0,
            "learner_cpus": self.learner_cpus >= 0,
            "poll_s": self.poll_s > 0,
            "max_unsent_batches": self.max_unsent_batches >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"ScaleOutSettings.{name} is out of range: {getattr(self, name)}")
        if self.token is not None and not self.token:
            raise ConfigError("token must not be empty (leave it unset for no token)")


def _no_images(_image: Any) -> Tensor:
    raise RequestError(
        415, "this server was built without a preprocessing: send a preprocessed .npy batch"
    )


def _rows_in(xs: list[Tensor]) -> int:
    """Samples in a list of requests (what ``max_batch`` counts)."""
    return sum(int(x.shape[0]) for x in xs)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


# Everything the deployments below use is defined above them: the decorators serialise the
# classes as they are defined.


# ---------------------------------------------------------------------------------- the learner
@serve.deployment(max_ongoing_requests=256)
class EarlyExitLearner:
    """One :class:`~earlyexit.OnlineDistiller` learning from the teacher signals of every replica."""

    def __init__(self, served: ServedModel) -> None:
        torch.set_num_threads(1)  # it trains small heads; the replicas need the cores
        config = dataclasses.replace(served.config, background=True)
        self.learner = OnlineDistiller(served.wrap(), config)
        self._lock = threading.Lock()  # record() calls arrive on several threads
        self._replicas: dict[str, dict[str, Any]] = {}
        self.signals = 0

    def _seen(self, replica: str, index: int, version: int) -> None:
        entry = self._replicas.setdefault(replica, {"index": index, "batches": 0})
        entry.update(heads_version=version, seen=time.monotonic())

    def record(self, batches: list[tuple[Any, float, int]], replica: str, index: int) -> None:
        """Learn from batches a replica served: ``(rows, serve_seconds, heads_version)`` each,
        in the order they were served."""
        with self._lock:
            for rows, serve_seconds, version in batches:
                self.learner.record(rows, serve_seconds)
                self._seen(replica, index, version)
                self._replicas[replica]["batches"] += 1
                self.signals += 1

    def poll(
        self, since: int, replica: str, index: int, version: int
    ) -> tuple[float, HeadsRelease | None]:
        """The audit share now, and the release if it is newer than ``since``."""
        with self._lock:
            self._seen(replica, index, version)
            release = self.learner.release()
        return release.audit_share, (release if release.version > since else None)

    def stats(self) -> dict[str, Any]:
        """The learner's stats, its heads version, and the version each live replica serves."""
        now = time.monotonic()
        with self._lock:
            live = {
                name: {k: v for k, v in entry.items() if k != "seen"}
                for name, entry in self._replicas.items()
                if now - entry["seen"] <= REPLICA_SILENCE_S
            }
            stats = json_safe(self.learner.stats())
            stats.update(
                heads_version=self.learner.heads_version, replicas=live, signals=self.signals
            )
        return stats

    def failure(self) -> str | None:
        error = self.learner.worker.error
        if error is None:
            return None
        return f"the background trainer failed ({type(error).__name__}: {error})"

    def save(self, path: str) -> dict[str, Any]:
        """Save the heads and thresholds now served (atomically), as ``eem.save`` writes them."""
        with self._lock:
            self.learner.release()  # install what the trainer has finished first
            self.learner.eem.save(path)
            return {"saved": path, "heads_version": self.learner.heads_version}

    def calibrate(self) -> dict[str, Any]:
        with self._lock:
            self.learner.calibrate()
        return self.stats()


# ---------------------------------------------------------------------------------- the replicas
http = fastapi.FastAPI(title="earlyexit", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
@serve.ingress(http)
class EarlyExitReplica:
    """One serving copy of the wrapped model (the HTTP ingress; see the module docstring)."""

    async def __init__(self, served: ServedModel, settings: ScaleOutSettings, learner: Any):
        _set_threads(served.threads)
        context = serve.get_replica_context()
        self.name = str(context.replica_id.unique_id)
        rank = getattr(context, "rank", None)
        self.index = int(getattr(rank, "rank", rank) or 0)
        eem = served.wrap()
        self.replica = ServingReplica(eem, served.config, index=self.index)
        self.num_exits = eem.num_exits
        param = next(eem.base_model.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        self.decoder = RequestDecoder(
            served.transform or _no_images,
            tuple(eem.input_size),
            dtype=dtype,
            max_pixels=settings.max_pixels,
        )
        self.settings = settings
        self.metrics = ServerMetrics(eem.num_exits)
        self.learner = learner
        self.requests = 0
        self.signals_dropped = 0
        self.signals_failed = 0
        # The latest release before the first request: a restarted replica serves what the
        # others serve from its first batch on.
        await self._follow_once()
        self._serve_batch.set_max_batch_size(settings.max_batch)
        self._serve_batch.set_batch_wait_timeout_s(settings.max_wait_ms / 1000.0)
        # Held while a batch is served: a release is installed only between two batches.
        self._serving = asyncio.Lock()
        self._outbox: asyncio.Queue = asyncio.Queue(maxsize=settings.max_unsent_batches)
        self._tasks = [
            asyncio.get_running_loop().create_task(self._follow()),
            asyncio.get_running_loop().create_task(self._send()),
        ]

    # -------------------------------------------------------------- following the learner
    async def _follow_once(self) -> None:
        share, release = await self.learner.poll.remote(
            self.replica.heads_version, self.name, self.index, self.replica.heads_version
        )
        self.replica.audit_share = share
        if release is not None:
            self.replica.install(release)

    async def _follow(self) -> None:
        """Fetch newer releases and install each between two batches (or at once when idle)."""
        while True:
            await asyncio.sleep(self.settings.poll_s)
            try:
                share, release = await self.learner.poll.remote(
                    self.replica.heads_version, self.name, self.index, self.replica.heads_version
                )
            except Exception:  # the learner is restarting: keep serving what is installed
                continue
            self.replica.audit_share = share
            if release is not None:
                async with self._serving:
                    self.replica.install(release)

    async def _send(self) -> None:
        """Hand the teacher signals to the learner in order: everything queued in one call (under
        load, one call carries many batches)."""
        while True:
            batches = [await self._outbox.get()]
            while not self._outbox.empty():
                batches.append(self._outbox.get_nowait())
            try:
                await self.learner.record.remote(batches, self.name, self.index)
            except Exception:
                self.signals_failed += len(batches)

    # -------------------------------------------------------------- serving
    async def _serve_rows(self, x: Tensor) -> ServedBatch:
        """Serve ``x`` with the installed heads and queue its teacher signals for the learner."""
        async with self._serving:  # no release is installed while this batch is served
            version = self.replica.heads_version
            started = time.perf_counter()
            result, rows = await asyncio.to_thread(self.replica.serve, x)
            seconds = time.perf_counter() - started
        served = ServedBatch(answers(result.logits, result.exit_index, result.accepted), version)
        self.metrics.record_batch(served)
        if self._outbox.full():  # the learner lags: drop the oldest signals, never block serving
            self._outbox.get_nowait()
            self.signals_dropped += 1
        self._outbox.put_nowait((rows, seconds, version))
        return served

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, batch_size_fn=_rows_in)
    async def _serve_batch(self, xs: list[Tensor]) -> list[ServedBatch]:
        served = await self._serve_rows(xs[0] if len(xs) == 1 else torch.cat(xs))
        shares, start = [], 0
        for part in xs:
            shares.append(served.rows(start, start + int(part.shape[0])))
            start += int(part.shape[0])
        return shares

    @http.post("/predict")
    async def predict(self, request: Request) -> Response:
        arrived = time.perf_counter()
        self.requests += 1
        try:
            content_type = request.headers.get("content-type")
            self.decoder.check_content_type(content_type)
            body = await read_body(request, self.settings.max_body_bytes)
            x = await asyncio.to_thread(self.decoder.decode, content_type, body)
            if x.shape[0] > self.settings.max_batch:  # too big to share a batch: served alone
                served = await self._serve_rows(x)
            else:
                served = await self._serve_batch(x)
        except RequestError as err:
            self.metrics.record_request(err.status)
            return json_error(err.status, err.message)
        except Exception as err:
            self.metrics.record_request(500)
            return json_error(500, f"serving failed ({type(err).__name__}: {err})")
        self.metrics.record_request(200, time.perf_counter() - arrived)
        return predict_answer(served, self.num_exits, replica=self.name)

    @http.get("/healthz")
    async def healthz(self) -> Response:
        try:
            failure = await self.learner.failure.remote()
        except Exception as err:
            failure = f"the learner cannot be reached ({type(err).__name__})"
        if failure is not None:
            return JSONResponse({"status": "failing", "error": failure}, status_code=503)
        return JSONResponse(
            {"status": "ok", "replica": self.name, "heads_version": self.replica.heads_version}
        )

    def _own(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "index": self.index,
            "heads_version": self.replica.heads_version,
            "requests": self.requests,
            "signals_dropped": self.signals_dropped,
            "signals_failed": self.signals_failed,
        }

    @http.get("/stats")
    async def stats(self) -> Response:
        stats = await self.learner.stats.remote()
        stats["replica"] = self._own()
        return JSONResponse(stats)

    @http.get("/metrics")
    async def metrics_text(self) -> Response:
        stats = await self.learner.stats.remote()
        body, content_type = self.metrics.render(stats, self.replica.heads_version)
        return Response(content=body, media_type=content_type)

    @http.post("/save")
    async def save(self, request: Request) -> Response:
        refused = authorize(request, self.settings.token)
        if refused is not None:
            return refused
        try:
            path = await save_path_of(request, None)
        except RequestError as err:
            return json_error(err.status, err.message)
        try:
            return JSONResponse(await self.learner.save.remote(path))
        except Exception as err:
            return json_error(500, f"could not save to {path}: {type(err).__name__}: {err}")

    @http.post("/calibrate")
    async def calibrate(self, request: Request) -> Response:
        refused = authorize(request, self.settings.token)
        if refused is not None:
            return refused
        return JSONResponse(await self.learner.calibrate.remote())


# ---------------------------------------------------------------------------------- the graph
def build_app(served: ServedModel, settings: ScaleOutSettings | None = None) -> Any:
    """The Ray Serve application: ``settings.replicas`` replicas and one learner.

    Run it with ``serve.run(app, name=APP_NAME)`` (its HTTP endpoints then answer on Serve's
    proxy), or bind it into your own application.

    Example:
        >>> app = build_app(ServedModel(wrap=make_wrapped_model), ScaleOutSettings(replicas=2))  # doctest: +SKIP
    """
    settings = settings or ScaleOutSettings()
    if not isinstance(served, ServedModel):
        raise ConfigError(f"expected a ServedModel, got {type(served).__name__}")
    learner = EarlyExitLearner.options(ray_actor_options={"num_cpus": settings.learner_cpus}).bind(
        served
    )
    return EarlyExitReplica.options(
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        max_ongoing_requests=max(2 * settings.max_batch, 8),
        max_queued_requests=settings.max_queued_requests,
    ).bind(served, settings, learner)


def learner_handle(app_name: str = APP_NAME) -> Any:
    """A handle to the running app's learner (``.save.remote(path)``, ``.stats.remote()``)."""
    return serve.get_deployment_handle("EarlyExitLearner", app_name=app_name)
