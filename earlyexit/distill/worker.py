"""The background trainer thread: waits for owed work, does it, and surfaces its failure."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from ..errors import BackgroundTrainingError

Job = TypeVar("Job")


class BackgroundWorker(Generic[Job]):
    """One daemon thread doing the learner's work while serving goes on.

    ``wake`` is the learner's condition (its lock guards the schedule); under it the worker waits
    until ``has_work()``, takes a job with ``claim()`` (still under the lock, so the job is
    decided on a consistent schedule), runs ``run(job)`` without the lock, then notifies every
    waiter. An exception ends the thread and is kept for :meth:`raise_error` (never swallowed).

    Example:
        >>> wake = threading.Condition(threading.RLock())
        >>> todo = [1, 2]
        >>> done = []
        >>> worker = BackgroundWorker(wake, lambda: bool(todo), todo.pop, done.append)
        >>> worker.start(); worker.wait_idle(lambda: not todo, timeout=5); worker.stop()
        >>> sorted(done)
        [1, 2]
    """

    def __init__(
        self,
        wake: threading.Condition,
        has_work: Callable[[], bool],
        claim: Callable[[], Job],
        run: Callable[[Job], None],
        name: str = "earlyexit-distill",
    ) -> None:
        self._wake = wake
        self._has_work = has_work
        self._claim = claim
        self._run = run
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.busy = False  # a job was claimed and is running (read under ``wake``'s lock)

    @property
    def running(self) -> bool:
        """Whether the thread was started and not stopped."""
        return self._thread is not None

    def start(self) -> None:
        """Start the thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop after its current job, and wait for it."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        thread.join()
        self._thread = None

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (it ends on :meth:`stop` or on a failure)."""
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def wait_idle(self, idle: Callable[[], bool], timeout: float | None = None) -> None:
        """Wake the thread and wait until ``idle()`` holds (or the thread failed)."""
        with self._wake:
            self._wake.notify_all()
            self._wake.wait_for(lambda: self.error is not None or idle(), timeout=timeout)

    def raise_error(self) -> None:
        """Raise :class:`BackgroundTrainingError` if the thread failed."""
        err = self.error
        if err is not None:
            raise BackgroundTrainingError(
                f"the background trainer failed ({type(err).__name__}: {err}); the served heads "
                "are the last ones published. Fix the cause and start a new OnlineDistiller (or "
                "OnlineDistiller.load a saved state)."
            ) from err

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    self._wake.wait_for(lambda: self._stop.is_set() or self._has_work())
                    if self._stop.is_set():
                        return
                    job = self._claim()
                    self.busy = True
                self._run(job)
                with self._wake:
                    self.busy = False
                    self._wake.notify_all()
        except BaseException as err:  # surfaced by the learner's next call, never swallowed
            with self._wake:
                self.error = err
                self.busy = False
                self._wake.notify_all()
