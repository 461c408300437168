"""Scale-out on Ray Serve: N replicas serve the wrapped model, one learner learns from all of them.

The deployment graph (:func:`build_app`):

- ``EarlyExitRouter`` (one, the HTTP ingress): reads each ``/predict`` body under the size limit
  and hands it to a replica by deployment handle. A request whose replica dies while serving it
  (killed, out of memory) is sent again to another replica, up to ``ScaleOutSettings.retries``
  times; after that the client gets a JSON 503 that says so (nothing hangs, nothing fails with a
  bare 500). The other endpoints go to the learner.
- ``EarlyExitReplica`` (``replicas`` copies): each decodes and serves requests with
  ``@serve.batch`` through a :class:`~earlyexit.distill.ServingReplica`, sends every batch's
  teacher signals (the head inputs and final logits of the samples that ran to the end, and the
  audit outcomes: features, never images) to the learner, and installs the learner's newest
  :class:`~earlyexit.distill.HeadsRelease` between two batches, whole (heads, gate and thresholds
  of one version: no batch is served with a mix). It follows the learner every ``poll_s``.
- ``EarlyExitLearner`` (one): an :class:`~earlyexit.OnlineDistiller` in background mode fed by
  :meth:`~earlyexit.OnlineDistiller.record`; it trains, calibrates and releases versioned heads,
  and knows which version each live replica serves, and its counters.

The endpoints are those of ``earlyexit serve`` (:mod:`.app`), through Ray's HTTP proxy:
``/predict`` (answers also name the ``replica``), ``/healthz``, ``/stats`` (the learner's stats;
``replicas``: each live replica's heads version and counters; ``router``: the router's
counters), ``/metrics`` (counted at the router, the learner's gauges), ``/save`` and
``/calibrate`` (to the learner; token as for the embedded server). Requests beyond
``max_queued_requests`` get a JSON 503 (back-pressure) instead of queueing without bound.

A replica that dies is restarted by Ray Serve; it installs the learner's latest release before it
takes a request. A retried request may have been served (and its teacher signals sent) just
before its replica died: the learner then sees those samples twice, which is rare and harmless.
Needs the ``ray`` extra (``pip install 'earlyexit[ray]'``); nothing else imports this.

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
from collections.abc import Awaitable, Callable
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
from .endpoints import authorize, json_error, predict_payload, read_body, save_path_of
from .metrics import ServerMetrics

serve = import_extra_package("ray.serve", "earlyexit serve --ray", "ray")
ray_exceptions = import_extra_package("ray.exceptions", "earlyexit serve --ray", "ray")
serve_exceptions = import_extra_package("ray.serve.exceptions", "earlyexit serve --ray", "ray")
fastapi = import_extra_package("fastapi", "earlyexit serve --ray", "ray")
responses = import_extra_package("fastapi.responses", "earlyexit serve --ray", "ray")

Request = fastapi.Request  # read by FastAPI from the endpoints' annotations
Response = fastapi.Response
JSONResponse = responses.JSONResponse

__all__ = [
    "APP_NAME",
    "ScaleOutSettings",
    "ServedModel",
    "build_app",
    "learner_handle",
    "send_with_retries",
]

#: The Serve application name used by ``earlyexit serve --ray``.
APP_NAME = "earlyexit"
#: A replica not heard from for this long is no longer listed in ``/stats``.
REPLICA_SILENCE_S = 10.0
#: A replica that died with a request on it (or was gone when the request was sent): the router
#: sends the request again, to whichever replica Ray's handle picks.
_REPLICA_LOST = (ray_exceptions.RayActorError, serve_exceptions.ReplicaUnavailableError)


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
        retries: times the router sends a request again when its replica died while serving it
            (0: the client gets the 503 at once).
        retry_backoff_s: wait before the first retry, doubled for each next one (Ray's handle
            needs a moment to learn that a replica is gone).
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
    retries: int = 2
    retry_backoff_s: float = 0.05

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
            "retries": self.retries >= 0,
            "retry_backoff_s": self.retry_backoff_s >= 0,
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

    def _seen(
        self, replica: str, index: int, version: int, counters: dict[str, int] | None = None
    ) -> None:
        entry = self._replicas.setdefault(replica, {"index": index, "batches": 0})
        entry.update(counters or {}, heads_version=version, seen=time.monotonic())

    def num_exits(self) -> int:
        """The wrapped model's exits (the router sizes its metrics with it)."""
        return int(self.learner.eem.num_exits)

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
        self,
        since: int,
        replica: str,
        index: int,
        version: int,
        counters: dict[str, int] | None = None,
    ) -> tuple[float, HeadsRelease | None]:
        """The audit share now, and the release if it is newer than ``since`` (``counters``:
        the replica's own, listed in ``/stats``)."""
        with self._lock:
            self._seen(replica, index, version, counters)
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
@serve.deployment
class EarlyExitReplica:
    """One serving copy of the wrapped model (see the module docstring); the router calls
    :meth:`predict`."""

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
        self.learner = learner
        self.requests = 0
        self.batches = 0  # batches served: the router counts each once by this number
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
    def _counters(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "batches_served": self.batches,
            "signals_dropped": self.signals_dropped,
            "signals_failed": self.signals_failed,
        }

    async def _poll(self) -> tuple[float, HeadsRelease | None]:
        version = self.replica.heads_version
        return await self.learner.poll.remote(
            version, self.name, self.index, version, self._counters()
        )

    async def _follow_once(self) -> None:
        share, release = await self._poll()
        self.replica.audit_share = share
        if release is not None:
            self.replica.install(release)

    async def _follow(self) -> None:
        """Fetch newer releases and install each between two batches (or at once when idle)."""
        while True:
            await asyncio.sleep(self.settings.poll_s)
            try:
                share, release = await self._poll()
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
    async def _serve_rows(self, x: Tensor) -> tuple[ServedBatch, int, int]:
        """Serve ``x`` with the installed heads and queue its teacher signals for the learner;
        returns the answers, the batch's number on this replica and its rows."""
        async with self._serving:  # no release is installed while this batch is served
            version = self.replica.heads_version
            started = time.perf_counter()
            result, rows = await asyncio.to_thread(self.replica.serve, x)
            seconds = time.perf_counter() - started
            self.batches += 1
            number = self.batches
        served = ServedBatch(answers(result.logits, result.exit_index, result.accepted), version)
        if self._outbox.full():  # the learner lags: drop the oldest signals, never block serving
            self._outbox.get_nowait()
            self.signals_dropped += 1
        self._outbox.put_nowait((rows, seconds, version))
        return served, number, int(x.shape[0])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, batch_size_fn=_rows_in)
    async def _serve_batch(self, xs: list[Tensor]) -> list[tuple[ServedBatch, int, int]]:
        served, number, rows = await self._serve_rows(xs[0] if len(xs) == 1 else torch.cat(xs))
        shares, start = [], 0
        for part in xs:
            shares.append((served.rows(start, start + int(part.shape[0])), number, rows))
            start += int(part.shape[0])
        return shares

    async def predict(self, content_type: str | None, body: bytes) -> dict[str, Any]:
        """Decode and serve one ``/predict`` body. Returns ``{"status", "answer"}`` (the JSON
        the client gets) and, when served, ``"batch": (replica, number, rows)`` of the batch it
        rode in (the router's batch metrics)."""
        self.requests += 1
        try:
            self.decoder.check_content_type(content_type)
            x = await asyncio.to_thread(self.decoder.decode, content_type, body)
            if x.shape[0] > self.settings.max_batch:  # too big to share a batch: served alone
                served, number, rows = await self._serve_rows(x)
            else:
                served, number, rows = await self._serve_batch(x)
        except RequestError as err:
            return {"status": err.status, "answer": {"error": err.message}}
        except Exception as err:
            return {
                "status": 500,
                "answer": {"error": f"serving failed ({type(err).__name__}: {err})"},
            }
        answer = predict_payload(served, self.num_exits, replica=self.name)
        return {"status": 200, "answer": answer, "batch": (self.name, number, rows)}


# ---------------------------------------------------------------------------------- the router
async def send_with_retries(
    send: Callable[[], Awaitable[dict[str, Any]]], retries: int, backoff_s: float
) -> tuple[dict[str, Any], int]:
    """Await ``send()`` (a replica's :meth:`EarlyExitReplica.predict` reply); while the replica
    it reached died under the request or was gone, send again after ``backoff_s`` (doubled each
    time), at most ``retries`` times. Returns the reply and how many times it was sent again.

    A request the replicas' queues refuse gets a 503 reply (``Retry-After``); one whose every try
    lost its replica gets a 503 reply that says so, with ``"replica_lost": True``. Any other
    error is raised.
    """
    delay = backoff_s
    for attempt in range(retries + 1):
        if attempt:
            await asyncio.sleep(delay)
            delay *= 2
        try:
            return await send(), attempt
        except _REPLICA_LOST:
            continue
        except serve_exceptions.BackPressureError:
            overloaded = {
                "error": "the replicas are overloaded (their queues are full); retry later"
            }
            return {"status": 503, "answer": overloaded, "headers": {"Retry-After": "1"}}, attempt
    lost = {
        "error": f"the replica serving this request stopped ({retries + 1} tries, each on a "
        "replica that died or was gone); Ray Serve restarts replicas: retry"
    }
    reply = {"status": 503, "answer": lost, "headers": {"Retry-After": "1"}, "replica_lost": True}
    return reply, retries


http = fastapi.FastAPI(title="earlyexit", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(max_ongoing_requests=4096)
@serve.ingress(http)
class EarlyExitRouter:
    """The HTTP ingress (see the module docstring): ``/predict`` to a replica, with retries when
    one dies under a request; the rest to the learner. It holds no model."""

    async def __init__(self, settings: ScaleOutSettings, replicas: Any, learner: Any):
        self.settings = settings
        self.replicas = replicas
        self.learner = learner
        self.metrics = ServerMetrics(await learner.num_exits.remote())
        self.requests = 0
        self.retried = 0  # sends again after a replica died under the request
        self.lost_replica = 0  # requests answered 503 because every try lost its replica
        self._last_batch: dict[str, int] = {}  # per replica, the highest batch number counted

    def _count_batch(self, replica: str, number: int, rows: int) -> None:
        """Count a replica's batch once, whichever of its requests comes back first (batches are
        numbered in the order each replica serves them)."""
        last = self._last_batch.get(replica, 0)
        if number > last:
            self._last_batch[replica] = number
            self.metrics.record_batches(number - last, rows)

    @http.post("/predict")
    async def predict(self, request: Request) -> Response:
        arrived = time.perf_counter()
        self.requests += 1
        try:
            body = await read_body(request, self.settings.max_body_bytes)
        except RequestError as err:
            self.metrics.record_request(err.status)
            return json_error(err.status, err.message)
        content_type = request.headers.get("content-type")
        try:
            reply, resent = await send_with_retries(
                lambda: self.replicas.predict.remote(content_type, body),
                self.settings.retries,
                self.settings.retry_backoff_s,
            )
        except Exception as err:  # not a replica's death: say what failed
            self.metrics.record_request(500)
            return json_error(500, f"serving failed ({type(err).__name__}: {err})")
        self.retried += resent
        status = reply["status"]
        if reply.get("replica_lost"):
            self.lost_replica += 1
        if status != 200:
            self.metrics.record_request(status)
            return JSONResponse(reply["answer"], status_code=status, headers=reply.get("headers"))
        answer = reply["answer"]
        served = ServedBatch(answer["predictions"], answer["heads_version"])
        self._count_batch(*reply["batch"])
        self.metrics.record_samples(served)
        self.metrics.record_request(200, time.perf_counter() - arrived)
        return JSONResponse(answer)

    @http.get("/healthz")
    async def healthz(self) -> Response:
        try:
            failure = await self.learner.failure.remote()
        except Exception as err:
            failure = f"the learner cannot be reached ({type(err).__name__})"
        if failure is not None:
            return JSONResponse({"status": "failing", "error": failure}, status_code=503)
        return JSONResponse({"status": "ok"})

    def _own(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "retried": self.retried,
            "lost_replica": self.lost_replica,
        }

    @http.get("/stats")
    async def stats(self) -> Response:
        stats = await self.learner.stats.remote()
        stats["router"] = self._own()
        return JSONResponse(stats)

    @http.get("/metrics")
    async def metrics_text(self) -> Response:
        stats = await self.learner.stats.remote()
        body, content_type = self.metrics.render(stats, stats["heads_version"])
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
    """The Ray Serve application: a router, ``settings.replicas`` replicas and one learner.

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
    replicas = EarlyExitReplica.options(
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        max_ongoing_requests=max(2 * settings.max_batch, 8),
        max_queued_requests=settings.max_queued_requests,
    ).bind(served, settings, learner)
    # The router only forwards: no CPU reserved, so it never keeps a replica from starting.
    return EarlyExitRouter.options(ray_actor_options={"num_cpus": 0}).bind(
        settings, replicas, learner
    )


def learner_handle(app_name: str = APP_NAME) -> Any:
    """A handle to the running app's learner (``.save.remote(path)``, ``.stats.remote()``)."""
    return serve.get_deployment_handle("EarlyExitLearner", app_name=app_name)
