"""When the learner calibrates, how much time learning has taken, and what phase it is in."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from torch import Tensor

from .._checks import expect_dict, expect_int, expect_number, expect_str, field_error


class Phase(str, Enum):
    """What the learner is doing (the first word of ``OnlineDistiller.stats()["phase"]``)."""

    WARM_UP = "warm-up"  # no calibration has opened a gate yet
    SERVING = "serving"  # at least one gate is open
    CLOSED = "closed"  # gates were open, evidence no longer supports any
    DRIFT = "drift"  # the drift monitor closed every gate

    def __str__(self) -> str:
        return self.value


@dataclass
class PhaseStatus:
    """The phase and a sentence on why (e.g. which exit drifted and by how much).

    Example:
        >>> str(PhaseStatus(Phase.CLOSED, "evidence no longer supports any gate"))
        'closed: evidence no longer supports any gate'
        >>> PhaseStatus.parse("serving")
        PhaseStatus(phase=<Phase.SERVING: 'serving'>, detail='')
    """

    phase: Phase
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.phase.value}: {self.detail}" if self.detail else self.phase.value

    @classmethod
    def parse(cls, text: str) -> PhaseStatus:
        """Read back what :meth:`__str__` wrote (saved learners keep the sentence)."""
        word, _, detail = text.partition(": ")
        return cls(Phase(word), detail)


@dataclass
class Schedule:
    """Calibration schedule, drift epoch and the wall-clock behind the learning time budget.

    Example:
        >>> schedule = Schedule()
        >>> schedule.calibration_due(samples=600, warmup=512, every=512)
        True
        >>> schedule.calibration_due(samples=700, warmup=512, every=512)  # 600 was the last
        False
    """

    calibrations: int = 0
    last_calibration: int = 0  # samples served at the last scheduled calibration
    serve_seconds: float = 0.0  # wall-clock of serving passes (the time budget's reference)
    learn_seconds: float = 0.0  # wall-clock of learning: bookkeeping, training, calibrations
    epoch: int = 0  # bumped by a drift alarm: older evidence and candidates are void
    # Learning time earned so far: each served batch earns its serving time times the budget in
    # force when it was served (higher while every gate is closed, see DistillConfig).
    allowance_seconds: float = 0.0
    # Samples served when a gate first opened (None before): how soon learning paid.
    first_open_sample: int | None = None

    def earn(self, served: float, rate: float) -> None:
        """Count ``served`` seconds of serving, earning ``rate`` times as much learning time.

        Example:
            >>> schedule = Schedule()
            >>> schedule.earn(2.0, rate=0.5)
            >>> schedule.serve_seconds, schedule.allowance_seconds
            (2.0, 1.0)
        """
        self.serve_seconds += served
        self.allowance_seconds += rate * served

    def affordable(self, seconds: float) -> bool:
        """Whether learning so far plus ``seconds`` more stays within the time earned."""
        return self.learn_seconds + seconds <= self.allowance_seconds

    def calibration_due(self, samples: int, warmup: int, every: int) -> bool:
        """Whether a calibration is due after ``samples`` served (and mark it done if so)."""
        due = samples >= warmup and samples - self.last_calibration >= every
        if due:
            self.last_calibration = samples
        return due

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """No tensors; the counts and clocks (JSON, in the shared ``counters`` record)."""
        return {}, {
            "counters": {
                "calibrations": self.calibrations,
                "last_calibration": self.last_calibration,
                "serve_seconds": self.serve_seconds,
                "learn_seconds": self.learn_seconds,
                "epoch": self.epoch,
                "allowance_seconds": self.allowance_seconds,
                "first_open_sample": self.first_open_sample,
            }
        }

    def load_state_dict(
        self, tensors: dict[str, Tensor], state: dict[str, Any], budget: float | None = None
    ) -> None:
        """Restore :meth:`state_dict` (other keys of the ``counters`` record are ignored), checked
        first (:func:`check_schedule_state`): a bad state changes nothing. A file saved before
        the allowance was kept earned ``budget`` times its serving time (the rule then)."""
        check_schedule_state(state)
        counters = state["counters"]
        self.calibrations = int(counters["calibrations"])
        self.last_calibration = int(counters["last_calibration"])
        self.serve_seconds = float(counters["serve_seconds"])
        self.learn_seconds = float(counters["learn_seconds"])
        self.epoch = int(counters["epoch"])
        earned = counters.get("allowance_seconds")
        if earned is None:
            earned = (budget or 0.0) * self.serve_seconds
        self.allowance_seconds = float(earned)
        first = counters.get("first_open_sample")
        self.first_open_sample = None if first is None else int(first)


#: Keys of the ``counters`` record a :class:`Schedule` saves.
SAVED_KEYS = ("calibrations", "last_calibration", "serve_seconds", "learn_seconds", "epoch")
#: Saved since (older files lack it: it is then rebuilt from the budget and the serving time).
LATER_KEYS = ("allowance_seconds", "first_open_sample")


def check_schedule_state(state: Any) -> None:
    """Check the saved counts and clocks of :meth:`Schedule.state_dict`: integers >= 0 and
    finite seconds >= 0. Raises a :class:`~earlyexit.CheckpointError` naming the field.

    Example:
        >>> check_schedule_state(Schedule().state_dict()[1])
    """
    counters = expect_dict(expect_dict(state, "state", ("counters",))["counters"], "counters")
    expect_dict(counters, "counters", SAVED_KEYS)
    for key in ("calibrations", "last_calibration", "epoch"):
        expect_int(counters[key], f"counters.{key}")
    for key in ("serve_seconds", "learn_seconds"):
        expect_number(counters[key], f"counters.{key}", low=0.0)
    if counters.get("allowance_seconds") is not None:
        expect_number(counters["allowance_seconds"], "counters.allowance_seconds", low=0.0)
    if counters.get("first_open_sample") is not None:
        expect_int(counters["first_open_sample"], "counters.first_open_sample")


def check_phase(text: Any) -> PhaseStatus:
    """The phase a saved learner was in (what :class:`PhaseStatus` wrote), checked.

    Example:
        >>> check_phase("closed: no evidence").phase
        <Phase.CLOSED: 'closed'>
    """
    expect_str(text, "phase")
    try:
        return PhaseStatus.parse(text)
    except ValueError:
        raise field_error("phase", f"a phase among {[p.value for p in Phase]}", text) from None
