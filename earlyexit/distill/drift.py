"""The drift monitor: is audited agreement provably below the target?

Each audited early answer is checked against the full model. The monitor keeps the latest
``drift_window`` of these per exit and tests "agreement < target" with a one-sided binomial test
at level ``drift_alpha``: per exit, or pooled over exits when the guarantee itself is pooled
(``calibration_mode="joint"``).

Under ``guarantee="expected"`` the promise is on disagreement among *all* served answers (those
that run to the end agree by definition), so the alarm tests that: "the share of served answers
that leave early and disagree exceeds ``1 - target``". Audits are drawn uniformly among held-out
traffic, exits alike, so the pooled audited early answers estimate the disagreement ``d`` among
early answers, and the share of traffic leaving early ``p`` is counted on every served sample
(known far more precisely than ``d``): served disagreement ``p * d > 1 - target`` is tested as
``d > (1 - target) / p``, the same binomial test at the target ``1 - (1 - target) / p``. After a
shift that makes early answers wrong this still fires (``p * d`` grows), but later than the strict
test when few samples leave early, which is what the weaker promise allows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._checks import expect_dict, expect_int, expect_tensor, field_error
from ..calibration import binomial_tail_pvalue


@dataclass(frozen=True)
class DriftAlarm:
    """Agreement provably below target: ``exit`` (-1: pooled over exits) agreed on
    ``n - failures`` of ``n`` audited samples."""

    exit: int
    n: int
    failures: int
    # Served-disagreement test (guarantee="expected"): the share of traffic leaving early.
    exit_share: float | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """Which answers drifted, in words."""
        if self.exit_share is not None:
            return f"early exits (pooled, {self.exit_share:.3f} of traffic leaving early)"
        return "early exits (pooled)" if self.exit < 0 else f"exit {self.exit}"


def drift_pvalue(n: int, failures: int, target: float) -> float:
    """P(at least ``failures`` disagreements among ``n`` | agreement exactly ``target``).

    Small: agreement is below the target. The upper tail of Binom(n, 1 - target) is the lower tail
    of the agreements, Binom(n, target), at ``n - failures``.

    Example:
        >>> round(drift_pvalue(400, 12, 0.99), 4)
        0.0008
    """
    eps = 1.0 - target
    return binomial_tail_pvalue(n - failures, n, 1.0 - eps)


class DriftMonitor:
    """Per-exit windows of audited agreement and the alarm test.

    Example:
        >>> monitor = DriftMonitor(num_exits=1, window=100, target=0.99, alpha=1e-3, pooled=False)
        >>> for ok in [True] * 90 + [False] * 10:
        ...     monitor.record(0, ok)
        >>> monitor.check()
        DriftAlarm(exit=0, n=100, failures=10)
    """

    def __init__(
        self,
        num_exits: int,
        window: int,
        target: float,
        alpha: float,
        pooled: bool,
        served: bool = False,
    ) -> None:
        self.target = target
        self.alpha = alpha
        self.pooled = pooled or served
        self.served = served  # test disagreement among all served answers (guarantee="expected")
        self.windows: list[deque[bool]] = [deque(maxlen=window) for _ in range(num_exits)]
        self.alarms = 0  # alarms raised, all time

    def record(self, exit_: int, agreed: bool) -> None:
        """An audited early answer at ``exit_`` and whether the full model agreed."""
        self.windows[exit_].append(bool(agreed))

    def counts(self, exit_: int) -> tuple[int, int]:
        """(audited, agreeing) in the window of ``exit_``."""
        window = self.windows[exit_]
        return len(window), sum(window)

    def check(self, exit_share: float | None = None) -> DriftAlarm | None:
        """The first window whose agreement is provably below target (p < ``alpha``), if any.

        A monitor built with ``served=True`` needs ``exit_share`` (share of recent traffic that
        left early) and alarms when the served disagreement ``exit_share * (1 - agreement)`` is
        provably above ``1 - target``.

        Example:
            >>> m = DriftMonitor(1, window=100, target=0.99, alpha=1e-3, pooled=True, served=True)
            >>> for ok in [True] * 90 + [False] * 10:
            ...     m.record(0, ok)
            >>> m.check(exit_share=0.05) is None  # 10% wrong of 5% leaving: 0.5% served
            True
            >>> m.check(exit_share=0.8).where  # 8% served: above 1%
            'early exits (pooled, 0.800 of traffic leaving early)'
        """
        target = self.target
        if self.served:
            if exit_share is None:
                raise ValueError("a served-disagreement monitor needs the exit share")
            if exit_share <= 1.0 - target:
                return None  # even all-wrong early answers keep served disagreement in bounds
            target = 1.0 - (1.0 - target) / exit_share
        windows: list[tuple[int, Iterable[bool]]] = list(enumerate(self.windows))
        if self.pooled:  # the guarantee is pooled: so is the alarm
            windows = [(-1, [ok for window in self.windows for ok in window])]
        for e, window in windows:
            window = list(window)
            n = len(window)
            if n == 0:
                continue
            failures = n - sum(window)
            if failures == 0:
                continue
            if drift_pvalue(n, failures, target) < self.alpha:
                return DriftAlarm(e, n, failures, exit_share if self.served else None)
        return None

    def acknowledge(self) -> None:
        """Count an alarm that was acted on and empty the windows (only new audits count)."""
        self.alarms += 1
        self.clear()

    def clear(self) -> None:
        """Empty every window."""
        for window in self.windows:
            window.clear()

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Checkpoint tensors (each window, oldest first) and the alarm count."""
        tensors = {
            f"monitor.{e}": torch.tensor(list(window), dtype=torch.bool)
            for e, window in enumerate(self.windows)
        }
        return tensors, {"counters": {"drift_alarms": self.alarms}}

    def load_state_dict(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, checked first (:func:`check_drift_state`): a bad state
        changes nothing."""
        window = self.windows[0].maxlen if self.windows else 0
        check_drift_state(tensors, state, len(self.windows), window or 0)
        for e, window in enumerate(self.windows):
            window.clear()
            window.extend(tensors[f"monitor.{e}"].tolist())
        self.alarms = int(state["counters"]["drift_alarms"])


def check_drift_state(tensors: Any, state: Any, num_exits: int, window: int) -> None:
    """Check a saved monitor (:meth:`DriftMonitor.state_dict`): one bool window per exit
    (``monitor.0 ..``), none longer than ``window``, and an alarm count >= 0. Raises a
    :class:`~earlyexit.CheckpointError` naming the field.

    Example:
        >>> monitor = DriftMonitor(2, window=10, target=0.9, alpha=1e-3, pooled=True)
        >>> check_drift_state(*monitor.state_dict(), num_exits=2, window=10)
    """
    counters = expect_dict(expect_dict(state, "state", ("counters",))["counters"], "counters")
    expect_int(
        expect_dict(counters, "counters", ("drift_alarms",))["drift_alarms"],
        "counters.drift_alarms",
    )
    for e in range(num_exits):
        saved = expect_tensor(tensors, f"monitor.{e}", (torch.bool,), (None,))
        if saved.shape[0] > window:
            raise field_error(
                f"monitor.{e}", f"at most drift_window={window} audits", saved.shape[0]
            )
    extra = sorted(
        k
        for k in tensors
        if k.startswith("monitor.") and k not in {f"monitor.{e}" for e in range(num_exits)}
    )
    if extra:
        raise field_error("monitor", f"windows monitor.0 .. monitor.{num_exits - 1}", extra)
