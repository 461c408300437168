"""What ``OnlineDistiller.stats()`` reports, as a typed record with a plain-JSON ``to_dict``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any


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
    exits: list[dict[str, Any]]
    evidence: int
    replay: int
    memory_bytes: int
    train_steps: int
    loss: float | None
    calibrations: int
    drift_alarms: int
    non_finite_dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict, keys in field order (exit states as strings)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
