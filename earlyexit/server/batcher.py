"""Dynamic batching on one serving thread: concurrent requests served together, in order.

torch is not async, so the event loop never runs the model: each request's checked batch is handed
to :meth:`DynamicBatcher.submit`, which returns a :class:`concurrent.futures.Future` the handler
awaits (``asyncio.wrap_future``). One thread takes the requests in arrival order and serves as many
as fit in ``max_batch`` samples together, waiting at most ``max_wait_s`` after the first of them
arrived for more to come; then it splits the answers back, one share per request.

With ``max_wait_s=0`` (the server's default) a request is served as soon as the thread is free,
and the requests that arrived while it was busy are served together next: no request waits for
company, and batches grow with the load.

Other work that must not interleave with serving (saving the heads, calibrating) goes through the
same thread with :meth:`DynamicBatcher.call`: it runs between two batches.

Example:
    >>> batcher = DynamicBatcher(backend.serve, max_batch=32, max_wait_s=0.002)  # doctest: +SKIP
    >>> batcher.start()  # doctest: +SKIP
    >>> answer = batcher.submit(x).result()  # a ServedBatch with x's rows  # doctest: +SKIP
    >>> batcher.close()  # serves what is queued, then stops  # doctest: +SKIP
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .backends import ServedBatch

__all__ = ["DynamicBatcher", "ServerClosing"]


class ServerClosing(RuntimeError):
    """The server is shutting down and takes no new work."""


@dataclass
class _Job:
    future: Future
    x: Tensor | None = None  # a request's rows, or
    call: Callable[[], Any] | None = None  # work to run between batches
    arrived: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return 0 if self.x is None else int(self.x.shape[0])


class DynamicBatcher:
    """Collect requests into batches and serve them on one thread (see the module docstring).

    Args:
        serve: serves a ``[B, C, H, W]`` batch, returns its answers in row order.
        max_batch: most samples served together (a request larger than this is served alone).
        max_wait_s: longest a request waits for others to join its batch.
        on_batch: called on the serving thread after each batch with its answers and the seconds
            serving took (for metrics); must not raise.
    """

    def __init__(
        self,
        serve: Callable[[Tensor], ServedBatch],
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.0,
        on_batch: Callable[[ServedBatch, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._serve = serve
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._jobs: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        #: Batches served and the samples in them (read from any thread).
        self.batches = 0
        self.samples = 0

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        """Start the serving thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="earlyexit-serve", daemon=True)
        self._thread.start()

    def submit(self, x: Tensor) -> Future:
        """Queue a checked batch; the future's result is a :class:`ServedBatch` of its rows.

        Raises:
            ServerClosing: :meth:`close` was called.
        """
        return self._put(_Job(Future(), x=x))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the serving thread between two batches; the future holds its result.

        Raises:
            ServerClosing: :meth:`close` was called.
        """
        return self._put(_Job(Future(), call=fn))

    def close(self, timeout: float | None = None) -> None:
        """Take no new work, finish everything queued, and stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    @property
    def queued(self) -> int:
        """Jobs waiting for the serving thread."""
        return len(self._jobs)

    def _put(self, job: _Job) -> Future:
        with self._wake:
            if self._closing:
                raise ServerClosing("the server is shutting down")
            self._jobs.append(job)
            self._wake.notify_all()
        return job.future

    # ------------------------------------------------------------------ serving thread
    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: bool(self._jobs) or self._closing)
                if not self._jobs:
                    return  # closing, and nothing left to do
                first = self._jobs.popleft()
                batch = [first] if first.call is None else []
                if batch:
                    self._collect(batch)
            if first.call is not None:
                _run(first.future, first.call)
            else:
                self._serve_batch(batch)

    def _collect(self, batch: list[_Job]) -> None:
        """Add queued requests to ``batch`` until it is full, a call is next, or the wait is over
        (called under the lock; waiting releases it)."""
        rows = batch[0].rows
        deadline = batch[0].arrived + self.max_wait_s
        while rows < self.max_batch:
            if self._jobs:
                nxt = self._jobs[0]
                if nxt.call is not None or rows + nxt.rows > self.max_batch:
                    return
                batch.append(self._jobs.popleft())
                rows += nxt.rows
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing:
                return
            self._wake.wait(remaining)

    def _serve_batch(self, batch: list[_Job]) -> None:
        # A request whose client went away (its future was cancelled) is not served.
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        assert all(job.x is not None for job in live)
        parts = [job.x for job in live]
        started = time.perf_counter()
        try:
            x = parts[0] if len(parts) == 1 else torch.cat(parts)  # type: ignore[arg-type]
            served = self._serve(x)
        except BaseException as err:  # every request of the batch gets the error
            for job in live:
                job.future.set_exception(err)
            return
        seconds = time.perf_counter() - started
        self.batches += 1
        self.samples += len(served.predictions)
        start = 0
        for job in live:
            job.future.set_result(served.rows(start, start + job.rows))
            start += job.rows
        if self._on_batch is not None:
            self._on_batch(served, seconds)


def _run(future: Future, fn: Callable[[], Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn()
    except BaseException as err:
        future.set_exception(err)
    else:
        future.set_result(result)
