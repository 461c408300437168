"""Cascades of whole models (BiSupervised, cascade of ensembles): cheapest tier first.

A request runs on tier 0; if the cascade's gate trusts that tier's answer (score >= threshold) it
leaves, otherwise it goes on to the next, bigger tier. The last tier (e.g. a large model behind an
HTTP endpoint, paid per call) answers everything that reaches it, and the final supervisor watches
its answers exactly as on an :class:`~earlyexit.model.EarlyExitModel`. The result is the same
:class:`~earlyexit.model.ExitResult`, with ``exit_index`` = the tier that answered.

Tiers:

* :class:`LocalTier`: one local model (cost: its MACs per sample unless given);
* :class:`EnsembleTier`: several models whose softmax probabilities are averaged; the agreement
  gate then votes among the members (the cascade-of-ensembles rule);
* :class:`EarlyExitTier`: a wrapped early-exit model (cost: the MACs of each sample's own path);
* :class:`RemoteTier`: a model behind an HTTP endpoint that takes and returns ``.npy`` bytes,
  with a per-call and per-sample cost, a timeout and a clear :class:`RemoteTierError`.

Gates and calibration are the ones of the early exits: :meth:`Cascade.record` runs every tier on a
batch of evidence, :meth:`Cascade.calibrate` picks thresholds with
:func:`~earlyexit.calibration.calibrate_thresholds` so that agreement with the last tier stays
above a target, and :meth:`Cascade.simulate` replays a policy on recorded evidence.

:class:`ModelServer` serves a model on the loopback interface with the same protocol (for tests
and local benchmarks; it is no production server).
"""

from __future__ import annotations

import http.server
import io
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from .calibration import CalibrationResult, calibrate_thresholds
from .errors import ConfigError, EarlyExitError, InputError
from .gates import Gate, GateContext, make_gate
from .model import EarlyExitModel, ExitResult
from .supervisors import Supervisor, make_supervisor


class RemoteTierError(EarlyExitError, RuntimeError):
    """A remote tier could not answer (unreachable, timed out, HTTP error, malformed reply)."""


@dataclass
class TierOutput:
    """What a tier returns for a batch.

    Attributes:
        logits: ``[B, K]`` the tier's answer.
        cost: ``[B]`` float64, what answering each sample cost (in the cascade's cost unit).
        members: for ensembles, each member's ``[B, K]`` logits (the agreement gate votes on them).
    """

    logits: Tensor
    cost: Tensor
    members: list[Tensor] | None = None


class Tier:
    """A stage of a cascade: subclasses implement :meth:`run`."""

    name: str = "tier"

    def run(self, x: Tensor) -> TierOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def _macs_per_sample(model: nn.Module, x: Tensor) -> int:
    from .evaluation.macs import count_macs

    return int(count_macs(model, (1, *x.shape[1:])))


class LocalTier(Tier):
    """A local classifier. ``cost`` per sample defaults to its MACs (counted once, at first use).

    Example:
        >>> tier = LocalTier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)))
        >>> out = tier.run(torch.randn(2, 3, 2, 2))
        >>> out.logits.shape, out.cost.tolist()
        (torch.Size([2, 3]), [36.0, 36.0])
    """

    def __init__(self, model: nn.Module, cost: float | None = None, name: str = "local") -> None:
        self.model = model
        self.cost = cost
        self.name = name

    def run(self, x: Tensor) -> TierOutput:
        if self.cost is None:
            self.cost = float(_macs_per_sample(self.model, x))
        with torch.no_grad():
            logits = self.model(x)
        return TierOutput(logits, torch.full((x.shape[0],), float(self.cost), dtype=torch.float64))


class EnsembleTier(Tier):
    """Several models answering together: the mean of their softmax probabilities (as log-probs).

    Example:
        >>> nets = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)) for _ in range(3)]
        >>> out = EnsembleTier(nets).run(torch.randn(2, 3, 2, 2))
        >>> len(out.members), out.cost.tolist()
        (3, [108.0, 108.0])
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        costs: Sequence[float] | None = None,
        name: str = "ensemble",
    ) -> None:
        if len(models) == 0:
            raise ConfigError("an ensemble tier needs at least one model")
        if costs is not None and len(costs) != len(models):
            raise ConfigError(f"got {len(costs)} costs for {len(models)} ensemble members")
        self.members = [
            LocalTier(m, None if costs is None else costs[i]) for i, m in enumerate(models)
        ]
        self.name = name

    def run(self, x: Tensor) -> TierOutput:
        outs = [m.run(x) for m in self.members]
        members = [o.logits for o in outs]
        probs = torch.stack([m.float().softmax(dim=-1) for m in members]).mean(dim=0)
        logits = probs.clamp_min(1e-12).log().to(members[0].dtype)
        return TierOutput(logits, sum(o.cost for o in outs), members)


class EarlyExitTier(Tier):
    """A wrapped early-exit model; each sample costs the MACs of the path it took.

    Example:
        >>> tier = EarlyExitTier(ee.wrap(model))  # doctest: +SKIP
    """

    def __init__(
        self, eem: EarlyExitModel, cost_per_mac: float = 1.0, name: str = "early_exit"
    ) -> None:
        self.eem = eem
        self.cost_per_mac = float(cost_per_mac)
        self.name = name

    def run(self, x: Tensor) -> TierOutput:
        res = self.eem.predict(x)
        paths = torch.tensor(self.eem.path_macs(), dtype=torch.float64)
        return TierOutput(res.logits, paths[res.exit_index.cpu()] * self.cost_per_mac)


def _to_npy(array: Tensor | np.ndarray) -> bytes:
    buffer = io.BytesIO()
    data = array.detach().cpu().numpy() if isinstance(array, Tensor) else array
    np.save(buffer, np.ascontiguousarray(data), allow_pickle=False)
    return buffer.getvalue()


def _from_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class RemoteTier(Tier):
    """A model behind an HTTP endpoint: ``POST`` a float32 ``[B, C, H, W]`` ``.npy`` body, get
    ``[B, K]`` logits back as ``.npy``. Batches larger than ``max_batch`` are split into calls.

    Args:
        url: the endpoint, e.g. ``"http://127.0.0.1:8080/predict"``.
        cost_per_call: cost of one request (shared by the samples it carries).
        cost_per_sample: cost of each sample on top.
        timeout: seconds to wait for each call before failing with :class:`RemoteTierError`.
        max_batch: most samples per call.
        num_classes: if given, replies of another width are rejected.

    Example:
        >>> with ModelServer(model) as server:  # doctest: +SKIP
        ...     tier = RemoteTier(server.url, cost_per_call=1e6, timeout=5.0)
    """

    def __init__(
        self,
        url: str,
        *,
        cost_per_call: float = 0.0,
        cost_per_sample: float = 0.0,
        timeout: float = 10.0,
        max_batch: int = 64,
        num_classes: int | None = None,
        name: str = "remote",
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"the remote tier needs an http(s) URL, got {url!r}")
        if timeout <= 0 or max_batch < 1:
            raise ConfigError("timeout must be > 0 and max_batch >= 1")
        self.url = url
        self.cost_per_call = float(cost_per_call)
        self.cost_per_sample = float(cost_per_sample)
        self.timeout = float(timeout)
        self.max_batch = int(max_batch)
        self.num_classes = num_classes
        self.name = name
        self.calls = 0

    def _call(self, chunk: Tensor) -> Tensor:
        request = urllib.request.Request(
            self.url,
            data=_to_npy(chunk.float()),
            headers={"Content-Type": "application/x-npy"},
            method="POST",
        )
        where = f"remote tier {self.name!r} at {self.url}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                body = reply.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:200].decode("utf-8", "replace")
            raise RemoteTierError(f"{where} answered HTTP {err.code}: {detail}") from err
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise RemoteTierError(
                f"{where} did not answer within {self.timeout:g} s or is unreachable ({reason}); "
                "check that the server runs, or raise timeout="
            ) from err
        self.calls += 1
        try:
            logits = torch.from_numpy(_from_npy(body).copy())
        except (ValueError, OSError) as err:
            raise RemoteTierError(f"{where} sent a reply that is not .npy data: {err}") from err
        width = self.num_classes
        if (
            logits.dim() != 2
            or logits.shape[0] != chunk.shape[0]
            or (width and logits.shape[1] != width)
        ):
            raise RemoteTierError(
                f"{where} returned shape {tuple(logits.shape)} for {chunk.shape[0]} samples; "
                f"expected [{chunk.shape[0]}, {width or 'K'}]"
            )
        return logits

    def run(self, x: Tensor) -> TierOutput:
        parts, costs = [], []
        for chunk in x.split(self.max_batch):
            parts.append(self._call(chunk).to(x.device))
            share = self.cost_per_call / chunk.shape[0] + self.cost_per_sample
            costs.append(torch.full((chunk.shape[0],), share, dtype=torch.float64))
        return TierOutput(torch.cat(parts), torch.cat(costs))


@dataclass
class CascadeRecord:
    """Every tier's answer on every evidence sample (for calibration and offline curves).

    Attributes:
        logits: ``[N, T, K]`` each tier's logits.
        scores: ``[N, T]`` the cascade gate's score of each tier's answer, with the earlier tiers as
            history (as serving computes it).
        cost: ``[N, T]`` float64 per-sample cost of each tier.
        labels: ``[N]`` labels when known (for accuracy), else ``None``.
    """

    logits: Tensor
    scores: Tensor
    cost: Tensor
    labels: Tensor | None = None

    def agree(self) -> Tensor:
        """``[N, T]`` bool: tier ``t``'s argmax equals the last tier's."""
        pred = self.logits.argmax(dim=-1)
        return pred == pred[:, -1:]


@dataclass
class CascadeStats:
    """Running totals of what a cascade served."""

    samples: int = 0
    answered: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)
    cost: float = 0.0
    seconds: list[float] = field(default_factory=list)


class Cascade:
    """Tiers of whole models, cheapest first; each tier's answer is kept when the gate trusts it.

    Args:
        tiers: :class:`Tier` objects (a bare ``nn.Module`` becomes a :class:`LocalTier`, an
            :class:`EarlyExitModel` an :class:`EarlyExitTier`, a list of modules an
            :class:`EnsembleTier`).
        gate: a gate name, config or object (as for ``wrap``); ``needs_history`` gates see the
            earlier tiers' logits, the agreement gate votes among an ensemble's members.
        supervisor: the final supervisor on the last tier's answers (name or object).
        thresholds: one per tier but the last; default all closed (``inf``): the last tier answers
            everything until thresholds are set or calibrated.

    Example:
        >>> small = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> big = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> cascade = Cascade([small, big], thresholds=[0.0])  # tier 0 answers all
        >>> cascade.predict(torch.randn(4, 3, 2, 2)).exit_index.tolist()
        [0, 0, 0, 0]
    """

    def __init__(
        self,
        tiers: Sequence[Tier | nn.Module | Sequence[nn.Module]],
        gate: str | Gate | dict = "max_softmax",
        supervisor: str | Supervisor | None = None,
        thresholds: Sequence[float] | None = None,
    ) -> None:
        self.tiers: list[Tier] = [self._as_tier(t, i) for i, t in enumerate(tiers)]
        if len(self.tiers) < 1:
            raise ConfigError("a cascade needs at least one tier")
        self.gate = make_gate(gate)
        self.supervisor = make_supervisor(supervisor)
        self._thresholds: tuple[float, ...] = (math.inf,) * (len(self.tiers) - 1)
        if thresholds is not None:
            self.set_thresholds(thresholds)
        self.stats = CascadeStats(
            answered=[0] * len(self.tiers),
            reached=[0] * len(self.tiers),
            seconds=[0.0] * len(self.tiers),
        )

    @staticmethod
    def _as_tier(tier: object, index: int) -> Tier:
        if isinstance(tier, Tier):
            return tier
        if isinstance(tier, EarlyExitModel):
            return EarlyExitTier(tier, name=f"tier{index}")
        if isinstance(tier, nn.Module):
            return LocalTier(tier, name=f"tier{index}")
        if isinstance(tier, (list, tuple)) and all(isinstance(m, nn.Module) for m in tier):
            return EnsembleTier(list(tier), name=f"tier{index}")
        raise ConfigError(
            f"tier {index} must be a Tier, an nn.Module, an EarlyExitModel or a list of modules, "
            f"got {type(tier).__name__}"
        )

    @property
    def num_tiers(self) -> int:
        """Number of tiers (the last one answers whatever reaches it)."""
        return len(self.tiers)

    @property
    def thresholds(self) -> tuple[float, ...]:
        """One gate threshold per tier but the last (``inf`` = always go on)."""
        return self._thresholds

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """Set every tier's threshold (``inf``: never stop there; ``-inf``: always stop there)."""
        values = [float(t) for t in thresholds]
        if len(values) != self.num_tiers - 1:
            raise ConfigError(
                f"expected {self.num_tiers - 1} thresholds (one per tier but the last), got {len(values)}"
            )
        if any(math.isnan(v) for v in values):
            raise ConfigError("a threshold is NaN; use inf to never stop at a tier")
        self._thresholds = tuple(values)

    def path_costs(self, record: CascadeRecord) -> Tensor:
        """``[N, T]`` cumulative cost of a sample that stops at each tier."""
        return record.cost.cumsum(dim=1)

    # -------------------------------------------------------------- serving
    def predict(self, x: Tensor) -> ExitResult:
        """Serve a batch; ``exit_index`` is the tier that answered each sample.

        The final supervisor's policy (flag / raise / fallback) applies to the last tier's answers.
        Per-sample costs of this call are left in ``self.last_cost``.
        """
        result, cost = self._serve(x)
        self.last_cost = cost
        if self.supervisor is not None:
            result = self.supervisor.enforce(x, result)
        return result

    __call__ = predict

    def _serve(self, x: Tensor) -> tuple[ExitResult, Tensor]:
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise InputError(
                f"expected a batch tensor [B, ...], got {getattr(x, 'shape', type(x))}"
            )
        batch = x.shape[0]
        cost = torch.zeros(batch, dtype=torch.float64)
        rows = torch.arange(batch, device=x.device)
        history: list[Tensor | None] = []
        answers: list[tuple[Tensor, Tensor, int, Tensor]] = []
        accepted = torch.ones(batch, dtype=torch.bool, device=x.device)
        last = self.num_tiers - 1
        for t, tier in enumerate(self.tiers):
            if rows.numel() == 0:
                break
            start = time.perf_counter()
            out = tier.run(x[rows])
            self.stats.seconds[t] += time.perf_counter() - start
            self.stats.reached[t] += int(rows.numel())
            cost[rows.cpu()] += out.cost
            scores = self.gate.score(
                out.logits, GateContext(t, rows, history, members=out.members)
            ).float()
            if t == last:
                leave = torch.ones_like(scores, dtype=torch.bool)
                if self.supervisor is not None:
                    accepted[rows] = self.supervisor.accept(out.logits)
            else:
                leave = scores >= self._thresholds[t]
            if bool(leave.any()):
                answers.append((rows[leave], out.logits[leave], t, scores[leave]))
                self.stats.answered[t] += int(leave.sum())
            keep = ~leave
            rows = rows[keep]
            history = [h[keep] for h in [*history, out.logits]]
        self.stats.samples += batch
        self.stats.cost += float(cost.sum())
        if not answers:
            raise InputError("an empty batch has no answers; serve at least one sample")
        num_classes = answers[0][1].shape[1]
        logits = torch.empty(batch, num_classes, dtype=answers[0][1].dtype, device=x.device)
        exit_index = torch.empty(batch, dtype=torch.long, device=x.device)
        confidence = torch.empty(batch, dtype=torch.float32, device=x.device)
        for r, lg, t, s in answers:
            logits[r] = lg.to(logits.dtype)
            exit_index[r] = t
            confidence[r] = s
        return ExitResult(logits, exit_index, confidence, accepted), cost

    # -------------------------------------------------------------- evidence and calibration
    def record(self, x: Tensor, labels: Tensor | None = None) -> CascadeRecord:
        """Run *every* tier on every sample of ``x`` (evidence for calibration and curves).

        Example:
            >>> rec = cascade.record(x_audit)  # doctest: +SKIP
            >>> cascade.calibrate(rec, target=0.99)  # doctest: +SKIP
        """
        rows = torch.arange(x.shape[0], device=x.device)
        logits, scores, costs, history = [], [], [], []
        for t, tier in enumerate(self.tiers):
            out = tier.run(x)
            scores.append(
                self.gate.score(
                    out.logits, GateContext(t, rows, list(history), out.members)
                ).float()
            )
            history.append(out.logits)
            logits.append(out.logits.float())
            costs.append(out.cost)
        return CascadeRecord(
            torch.stack(logits, dim=1),
            torch.stack(scores, dim=1).cpu(),
            torch.stack(costs, dim=1),
            labels,
        )

    def calibrate(
        self, record: CascadeRecord, target: float, confidence: float = 0.95, **kwargs: object
    ) -> CalibrationResult:
        """Thresholds so that agreement with the last tier among samples that stop early is at
        least ``target`` with ``confidence`` (Learn-then-Test, as for early exits); sets them.

        Example:
            >>> cascade.calibrate(cascade.record(x_audit), target=0.98)  # doctest: +SKIP
        """
        if self.num_tiers < 2:
            raise ConfigError("a one-tier cascade has nothing to calibrate")
        agree = record.agree()[:, :-1]
        result = calibrate_thresholds(record.scores[:, :-1], agree, target, confidence, **kwargs)
        self.set_thresholds(result.thresholds)
        return result

    def simulate(self, record: CascadeRecord, thresholds: Sequence[float] | None = None) -> dict:
        """Replay a policy on recorded evidence: where each sample stops, cost, agreement.

        Returns a dict with ``exit_index`` ``[N]``, ``cost`` (mean per sample), ``cost_saving``
        (vs running only the last tier), ``agreement`` (with the last tier), ``tier_rates`` and,
        with labels, ``accuracy``.

        Example:
            >>> cascade.simulate(rec, [0.9])["cost_saving"]  # doctest: +SKIP
        """
        thr = self._thresholds if thresholds is None else tuple(float(t) for t in thresholds)
        n, tiers = record.scores.shape
        stop = torch.full((n,), tiers - 1, dtype=torch.long)
        open_ = torch.ones(n, dtype=torch.bool)
        for t in range(tiers - 1):
            leave = open_ & (record.scores[:, t] >= thr[t])
            stop[leave] = t
            open_ &= ~leave
        paid = self.path_costs(record).gather(1, stop[:, None]).squeeze(1)
        pred = record.logits.argmax(-1).gather(1, stop[:, None]).squeeze(1)
        final = record.logits[:, -1].argmax(-1)
        last_only = float(record.cost[:, -1].mean())
        out = {
            "exit_index": stop,
            "cost": float(paid.mean()),
            "cost_saving": 1.0 - float(paid.mean()) / last_only if last_only > 0 else math.nan,
            "agreement": float((pred == final).float().mean()),
            "tier_rates": torch.bincount(stop, minlength=tiers).float().div(n).tolist(),
        }
        if record.labels is not None:
            out["accuracy"] = float((pred == record.labels).float().mean())
            out["accuracy_last"] = float((final == record.labels).float().mean())
        return out


class ModelServer:
    """Serve ``model`` over HTTP on the loopback interface with the :class:`RemoteTier` protocol.

    Bounded: it rejects bodies over ``max_body_bytes``, stops by itself after ``max_requests``
    requests or ``lifetime`` seconds, and always on leaving the ``with`` block. Loopback only: a
    test and benchmark helper, not a production server.

    Example:
        >>> with ModelServer(torch.nn.Linear(4, 2), max_requests=1) as server:  # doctest: +SKIP
        ...     RemoteTier(server.url).run(torch.randn(3, 4)).logits.shape
        torch.Size([3, 2])
    """

    LOOPBACK = ("127.0.0.1", "::1", "localhost")

    def __init__(
        self,
        model: nn.Module | Callable[[Tensor], Tensor],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_requests: int | None = 1000,
        max_body_bytes: int = 64 * 2**20,
        lifetime: float | None = 600.0,
        delay: float = 0.0,
    ) -> None:
        if host not in self.LOOPBACK:
            raise ConfigError(f"ModelServer only binds to loopback ({self.LOOPBACK}), got {host!r}")
        self.model = model
        self.max_requests = max_requests
        self.max_body_bytes = max_body_bytes
        self.lifetime = lifetime
        self.delay = delay  # seconds to sleep per request (tests of client timeouts)
        self.requests = 0
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        """The endpoint, e.g. ``http://127.0.0.1:40123/predict``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/predict"

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _reply(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                if not owner._admit():  # the bound holds even before the socket is closed
                    self._reply(503, b"server has served its max_requests", "text/plain")
                    return
                length = int(self.headers.get("Content-Length", 0))
                if length <= 0 or length > owner.max_body_bytes:
                    self._reply(413, b"body missing or too large", "text/plain")
                    return
                body = self.rfile.read(length)
                if owner.delay:
                    time.sleep(owner.delay)
                try:
                    x = torch.from_numpy(_from_npy(body).copy())
                    with torch.no_grad():
                        logits = owner.model(x)
                    reply = _to_npy(logits.float())
                except Exception as err:  # the client gets the reason, the server lives on
                    self._reply(500, f"{type(err).__name__}: {err}".encode(), "text/plain")
                else:
                    self._reply(200, reply, "application/x-npy")
                finally:
                    owner._finished()

        return Handler

    def _admit(self) -> bool:
        """Count a request before serving it (so ``requests`` is exact once the reply is read)."""
        with self._lock:
            if self.max_requests is not None and self.requests >= self.max_requests:
                return False
            self.requests += 1
            return True

    def _finished(self) -> None:
        if self.max_requests is not None and self.requests >= self.max_requests:
            # shutdown() waits for serve_forever to return: call it from another thread.
            threading.Thread(target=self.stop, daemon=True).start()

    def start(self) -> ModelServer:
        """Start serving in a daemon thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        if self.lifetime is not None:
            self._timer = threading.Timer(self.lifetime, self.stop)
            self._timer.daemon = True
            self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None:
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "Cascade",
    "CascadeRecord",
    "CascadeStats",
    "EarlyExitTier",
    "EnsembleTier",
    "LocalTier",
    "ModelServer",
    "RemoteTier",
    "RemoteTierError",
    "Tier",
    "TierOutput",
]
