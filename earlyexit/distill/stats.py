"""What ``OnlineDistiller.stats()`` reports, as a typed record with a plain-JSON ``to_dict``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from ..calibration import clopper_pearson_lower


def _plain(value: Any) -> Any:
    """Enums to their values, recursively: the dict is plain JSON, as callers expect."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass
class LearnerStats:
    """What the learner has seen and decided; see ``OnlineDistiller.stats`` for each field.

    ``to_dict()`` keeps the field order (the keys every report and the CLI read).
    """

    samples: int
    phase: str
    exit_rates: list[float]
    exit_rates_total: list[float]
    audited_agreement: list[float | None]
    audited_lower_bound: list[float | None]
    thresholds: list[float]
    gate: str
    mac_saving: float
    mac_saving_total: float
    expected_mac_saving: float
    target_agreement: float
    confidence: float
    guarantee: str
    exits: list[dict[str, Any]]
    evidence: int
    replay: int
    memory_bytes: int
    train_steps: int
    loss: float | None
    calibrations: int
    drift_alarms: int
    mix_shifts: int = 0
    dormant_exits: list[int] = field(default_factory=list)
    non_finite_dropped: int = 0
    first_open_sample: int | None = None
    head_time_fractions: list[float] | None = None
    replay_ratio: float = 0.0
    learning_cost: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict, keys in field order (exit states as strings)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def audited_agreement(drift: Any, traffic: Any, num_exits: int, confidence: float) -> list[dict]:
    """Per exit: audited early answers in the drift window and all time, the share that agreed
    with the full model, and the window's one-sided lower bound at ``confidence``.

    ``drift`` is the learner's :class:`~earlyexit.distill.drift.DriftMonitor`, ``traffic`` its
    :class:`~earlyexit.distill.traffic.TrafficCounters`.
    """
    out = []
    for e in range(num_exits):
        n, ok = drift.counts(e)
        n_all, ok_all = traffic.audited[e], traffic.audited_agree[e]
        out.append(
            {
                "audited": n,
                "agreement": ok / n if n else None,
                "lower_bound": clopper_pearson_lower(ok, n, confidence) if n else None,
                "audited_total": n_all,
                "agreement_total": ok_all / n_all if n_all else None,
            }
        )
    return out


def exit_entries(
    eem: Any,
    thresholds: Sequence[float],
    exit_rates: Sequence[float],
    agreement: Sequence[dict],
    reports: Sequence[dict],
) -> list[dict[str, Any]]:
    """The ``exits`` entries of the stats: each exit's name, threshold, recent exit rate, head
    cost, audited agreement and the calibrator's report (state and reason)."""
    return [
        {
            "name": point.name,
            "threshold": thresholds[e],
            "exit_rate": exit_rates[e],
            "head_macs": eem.head_macs[e],
            **agreement[e],
            **reports[e],
        }
        for e, point in enumerate(eem.exits)
    ]
