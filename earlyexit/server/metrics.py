"""The server's Prometheus metrics (``GET /metrics``), every name prefixed ``earlyexit_``.

======================================  =========  ==============================================
name                                    type       what
======================================  =========  ==============================================
``earlyexit_requests_total``            counter    ``/predict`` requests by ``outcome``: ``ok``,
                                                   ``bad_request`` (400), ``too_large`` (413),
                                                   ``unsupported_media_type`` (415),
                                                   ``unavailable`` (503: overloaded or shutting
                                                   down),
                                                   ``error`` (500)
``earlyexit_samples_total``             counter    samples answered, by ``exit`` (``exit`` equal
                                                   to the number of exits: the full model)
``earlyexit_batches_total``             counter    batches served
``earlyexit_audited_agreement``         gauge      per ``exit``: share of the latest audited early
                                                   answers that agree with the full model (NaN
                                                   until one is audited)
``earlyexit_mac_saving``                gauge      share of the base model's MACs saved on the
                                                   latest ~2048 samples, audits included
``earlyexit_heads_version``             gauge      publications of heads + thresholds so far
``earlyexit_request_latency_seconds``   histogram  time from a ``/predict`` request's arrival to
                                                   its answer (answered requests)
``earlyexit_batch_size``                histogram  samples per served batch
======================================  =========  ==============================================

On Ray Serve the router counts them: requests, samples and latency as they pass through it;
batches by the numbers replicas give them (a batch whose answers all came back after a later
batch's is counted but its size not observed).

Each server has its own registry (several servers, e.g. in tests, never share counts). The gauges
read from the learner's ``stats()`` are refreshed when ``/metrics`` is scraped.

Example:
    >>> metrics = ServerMetrics(num_exits=4)  # doctest: +SKIP
    >>> metrics.record_request("ok", 0.004)  # doctest: +SKIP
    >>> body, content_type = metrics.render({"audited_agreement": [None] * 4}, heads_version=0)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .._optional import import_extra_package
from .backends import ServedBatch

prometheus = import_extra_package("prometheus_client", "earlyexit serve (its /metrics)", "serve")

__all__ = ["OUTCOMES", "ServerMetrics"]

#: Outcomes of a ``/predict`` request, as counted by ``earlyexit_requests_total``.
OUTCOMES: dict[int, str] = {
    200: "ok",
    400: "bad_request",
    413: "too_large",
    415: "unsupported_media_type",
    500: "error",
    503: "unavailable",
}

#: Request latency buckets, seconds: a millisecond-scale model up to a slow one under load.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
#: Batch size buckets, samples.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """The metrics of one server, in their own registry (see the module docstring)."""

    def __init__(self, num_exits: int) -> None:
        registry = prometheus.CollectorRegistry()
        self.registry = registry
        self.num_exits = num_exits
        self.requests = prometheus.Counter(
            "earlyexit_requests",
            "/predict requests by outcome",
            ["outcome"],
            registry=registry,
        )
        self.samples = prometheus.Counter(
            "earlyexit_samples",
            "Samples answered, by the exit that answered (exit = number of exits: the full model)",
            ["exit"],
            registry=registry,
        )
        self.batches = prometheus.Counter("earlyexit_batches", "Batches served", registry=registry)
        self.agreement = prometheus.Gauge(
            "earlyexit_audited_agreement",
            "Share of the latest audited early answers that agree with the full model, per exit",
            ["exit"],
            registry=registry,
        )
        self.mac_saving = prometheus.Gauge(
            "earlyexit_mac_saving",
            "Share of the base model's MACs saved on the latest samples (audits included)",
            registry=registry,
        )
        self.heads_version = prometheus.Gauge(
            "earlyexit_heads_version",
            "Publications of heads and thresholds by the learner",
            registry=registry,
        )
        self.latency = prometheus.Histogram(
            "earlyexit_request_latency_seconds",
            "Time from a /predict request's arrival to its answer",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = prometheus.Histogram(
            "earlyexit_batch_size",
            "Samples per served batch",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        # Every label value from the start: a dashboard sees zeros, not missing series.
        for outcome in OUTCOMES.values():
            self.requests.labels(outcome=outcome)
        for e in range(num_exits + 1):
            self.samples.labels(exit=str(e))
        for e in range(num_exits):
            self.agreement.labels(exit=str(e)).set(math.nan)

    def record_request(self, status: int, seconds: float | None = None) -> None:
        """Count a ``/predict`` request by its HTTP status; ``seconds`` when it was answered."""
        self.requests.labels(outcome=OUTCOMES.get(status, "error")).inc()
        if seconds is not None:
            self.latency.observe(seconds)

    def record_batch(self, served: ServedBatch) -> None:
        """Count a served batch: its size and which exit answered each sample."""
        self.batches.inc()
        self.batch_size.observe(len(served.predictions))
        self.record_samples(served)

    def record_batches(self, count: int, rows: int) -> None:
        """Count ``count`` batches served elsewhere, the last of them ``rows`` samples (the Ray
        router learns of a replica's batches by their numbers)."""
        self.batches.inc(count)
        self.batch_size.observe(rows)

    def record_samples(self, served: ServedBatch) -> None:
        """Count answered samples by the exit that answered each (and the heads version), not
        a batch: with Ray the router sees requests, and counts batches by their numbers."""
        counts = [0] * (self.num_exits + 1)
        for prediction in served.predictions:
            counts[prediction["exit"]] += 1
        for e, n in enumerate(counts):
            if n:
                self.samples.labels(exit=str(e)).inc(n)
        self.heads_version.set(served.heads_version)

    def render(self, stats: dict[str, Any], heads_version: int) -> tuple[bytes, str]:
        """Refresh the gauges from the learner's ``stats`` and return the exposition text and
        its content type."""
        agreement: Sequence[float | None] = stats.get("audited_agreement") or []
        for e, value in enumerate(agreement):
            self.agreement.labels(exit=str(e)).set(math.nan if value is None else float(value))
        saving = stats.get("mac_saving")
        self.mac_saving.set(0.0 if saving is None else float(saving))
        self.heads_version.set(heads_version)
        return prometheus.generate_latest(self.registry), prometheus.CONTENT_TYPE_LATEST
