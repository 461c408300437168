"""When the learner calibrates, how many optimizer steps it owes, what learning costs, and what
phase it is in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch import Tensor

from .._checks import (
    expect_dict,
    expect_int,
    expect_list,
    expect_number,
    expect_str,
    field_error,
)


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


#: Served samples per block of the recent learning cost (``stats()["learning_cost"]``): the
#: recent ratio covers the block being filled and the one before it.
COST_BLOCK = 2048
#: Halvings of the warm-up replay ratio past which the taper stops counting (the ratio is long
#: at its steady-state floor by then; keeps the saved count bounded).
MAX_TAPER = 64


@dataclass
class Schedule:
    """When the learner calibrates, how many optimizer steps it owes, and what learning costs.

    Learning is scheduled in samples, never in seconds (unless ``train_time_budget`` opts in to a
    wall-clock cap): every training row stored owes ``replay_ratio / batch_size`` optimizer steps
    at the replay ratio in force (:meth:`replay_ratio`). That ratio starts at the warm-up ratio
    (learn hard: nothing exits yet, only learning makes savings possible) and halves after each
    *plateau window*: ``plateau_window`` training rows whose mean *fresh loss* (the student's
    distillation loss on rows it has not trained on yet, measured just before they join replay)
    is not ``plateau_tolerance`` below the best window so far. It never goes below the
    steady-state ratio (enough to follow slow drift); a drift alarm restarts it at the warm-up
    ratio (:meth:`restart_learning`). Everything here is a function of sample counts and losses,
    so the same seed and stream give the same steps on an idle or a busy machine.

    Example:
        >>> schedule = Schedule()
        >>> schedule.calibration_due(samples=600, warmup=512, every=512)
        True
        >>> schedule.calibration_due(samples=700, warmup=512, every=512)  # 600 was the last
        False
        >>> schedule.replay_ratio(warmup=64.0, steady=4.0)
        64.0
        >>> schedule.observe(loss_sum=100.0, rows=100, window=100, tolerance=0.05)  # first: best
        >>> schedule.observe(loss_sum=99.0, rows=100, window=100, tolerance=0.05)  # flat: taper
        >>> schedule.replay_ratio(warmup=64.0, steady=4.0)
        32.0
    """

    calibrations: int = 0
    last_calibration: int = 0  # samples served at the last scheduled calibration
    serve_seconds: float = 0.0  # wall-clock of serving passes (reported; the opt-in cap's base)
    learn_seconds: float = 0.0  # wall-clock of learning: bookkeeping, training, calibrations
    epoch: int = 0  # bumped by a drift alarm: older evidence and candidates are void
    # Learning time earned so far (opt-in wall-clock cap only): each served batch earns its
    # serving time times the budget in force when it was served (see DistillConfig).
    allowance_seconds: float = 0.0
    # Samples served when a gate first opened (None before): how soon learning paid.
    first_open_sample: int | None = None
    # The learning schedule: halvings of the warm-up replay ratio so far (0: learning hard), the
    # best window's mean fresh loss, and the window being filled.
    taper: int = 0
    best_loss: float | None = None
    window_loss: float = 0.0
    window_rows: int = 0
    # Learning work in MACs (head training, and calibration: scoring, gate fitting, the
    # student's look at fresh rows), all time; and per block of COST_BLOCK served samples, the
    # block being filled and the one before (served MACs, learning MACs, samples).
    train_macs: int = 0
    calibration_macs: int = 0
    # Learning MACs earned so far by the MACs served (see DistillConfig.learn_macs_budget).
    allowance_macs: float = 0.0
    block: list[int] = field(default_factory=lambda: [0, 0, 0])
    last_block: list[int] = field(default_factory=lambda: [0, 0, 0])
    # What the last calibration scored: (epoch, training steps, evidence rows ever added); -1:
    # nothing yet. Heads that have not trained since need only the rows added since scored.
    scored: list[int] = field(default_factory=lambda: [-1, -1, 0])

    # ------------------------------------------------------------------ wall-clock (opt-in cap)
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

    # ------------------------------------------------------------------ the learning schedule
    def replay_ratio(self, warmup: float, steady: float) -> float:
        """Replay samples each stored training row owes now: the warm-up ratio halved once per
        plateau window so far, never below ``steady`` (a warm-up ratio below ``steady`` is read
        as ``steady``: a flat schedule).

        Example:
            >>> Schedule(taper=3).replay_ratio(warmup=64.0, steady=4.0)
            8.0
        """
        return max(steady, max(warmup, steady) * 0.5**self.taper)

    def observe(self, loss_sum: float, rows: int, window: int, tolerance: float) -> None:
        """Count the student's fresh loss on ``rows`` training rows (``loss_sum``: their summed
        loss, before it trains on them). Once ``window`` rows are in, the window closes: a mean
        at least ``tolerance`` (relative) below the best window so far is progress (it becomes
        the best); anything else is a plateau and halves the replay ratio (:meth:`replay_ratio`).
        A non-finite loss is not evidence of anything: it is left out.

        Example:
            >>> schedule = Schedule()
            >>> schedule.observe(loss_sum=50.0, rows=50, window=100, tolerance=0.1)  # still open
            >>> schedule.window_rows, schedule.best_loss
            (50, None)
        """
        if rows <= 0 or not math.isfinite(loss_sum):
            return
        self.window_loss += loss_sum
        self.window_rows += rows
        if self.window_rows < window:
            return
        mean = self.window_loss / self.window_rows
        self.window_loss, self.window_rows = 0.0, 0
        if self.best_loss is None or mean < self.best_loss * (1.0 - tolerance):
            self.best_loss = mean
            return
        self.best_loss = min(self.best_loss, mean)
        self.taper = min(self.taper + 1, MAX_TAPER)

    def restart_learning(self) -> None:
        """Back to the warm-up replay ratio, progress forgotten (after a drift alarm: the heads
        must learn new traffic, and their old best loss says nothing about it)."""
        self.taper = 0
        self.best_loss = None
        self.window_loss, self.window_rows = 0.0, 0

    # ------------------------------------------------------------------ learning cost
    def count_serving(self, macs: int, samples: int) -> None:
        """A served batch: ``samples`` samples that cost ``macs`` MACs (audits included)."""
        self.block[0] += int(macs)
        self.block[2] += int(samples)
        if self.block[2] >= COST_BLOCK:
            self.last_block, self.block = self.block, [0, 0, 0]

    def count_learning(self, macs: int, calibration: bool = False) -> None:
        """Learning work of ``macs`` MACs: head training, or (``calibration``) calibration work."""
        if calibration:
            self.calibration_macs += int(macs)
        else:
            self.train_macs += int(macs)
        self.block[1] += int(macs)

    def earn_macs(self, served_macs: int, rate: float) -> None:
        """A served batch that cost ``served_macs`` earns ``rate`` times as many learning MACs.

        Example:
            >>> schedule = Schedule()
            >>> schedule.earn_macs(1000, rate=0.25)
            >>> schedule.macs_affordable(250), schedule.macs_affordable(251)
            (True, False)
        """
        self.allowance_macs += rate * served_macs

    def rows_to_score(self, epoch: int, steps: int, added: int, have: int) -> int:
        """Evidence rows a calibration must score: all ``have`` when the heads trained (or the
        epoch changed) since the last calibration, else only those added since (the others
        were scored with the same heads; the calibrator keeps their logits). Counted from the
        saved record, so a resumed learner counts what one that never stopped counts (its
        first calibration, with nothing kept in memory, rescores every row: uncounted).

        Example:
            >>> s = Schedule(scored=[0, 40, 900])
            >>> s.rows_to_score(epoch=0, steps=40, added=1000, have=1000), s.rows_to_score(0, 41, 1000, 1000)
            (100, 1000)
        """
        if self.scored[:2] == [epoch, steps]:
            return max(0, min(have, added - self.scored[2]))
        return have

    def mark_scored(self, epoch: int, steps: int, added: int) -> None:
        """Remember what a calibration scored (see :meth:`rows_to_score`)."""
        self.scored = [int(epoch), int(steps), int(added)]

    def macs_affordable(self, macs: int) -> bool:
        """Whether learning so far plus ``macs`` more stays within the learning MACs earned."""
        return self.train_macs + self.calibration_macs + macs <= self.allowance_macs

    def learning_cost(self, served_macs: int) -> dict[str, float | int | None]:
        """Learning work next to serving (``served_macs``: MACs served so far, audits included):
        ``macs_ratio_total`` and ``macs_ratio_recent`` (learning MACs over served MACs, all time
        and over the current and previous block of ``COST_BLOCK`` samples), ``seconds_ratio_total``
        (learning wall-clock over serving wall-clock), the MAC counts, ``None`` before anything
        was served.

        Example:
            >>> schedule = Schedule()
            >>> schedule.count_serving(1000, samples=10)
            >>> schedule.count_learning(50)
            >>> schedule.learning_cost(served_macs=1000)["macs_ratio_total"]
            0.05
        """
        learned = self.train_macs + self.calibration_macs
        recent_served = self.block[0] + self.last_block[0]
        recent_learned = self.block[1] + self.last_block[1]
        return {
            "macs_ratio_total": learned / served_macs if served_macs else None,
            "macs_ratio_recent": recent_learned / recent_served if recent_served else None,
            "seconds_ratio_total": self.learn_seconds / self.serve_seconds
            if self.serve_seconds
            else None,
            "train_macs": self.train_macs,
            "calibration_macs": self.calibration_macs,
            "served_macs": int(served_macs),
        }

    # ------------------------------------------------------------------ persistence
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
                "taper": self.taper,
                "best_loss": self.best_loss,
                "window_loss": self.window_loss,
                "window_rows": self.window_rows,
                "train_macs": self.train_macs,
                "calibration_macs": self.calibration_macs,
                "cost_block": list(self.block),
                "cost_last_block": list(self.last_block),
                "allowance_macs": self.allowance_macs,
                "scored": list(self.scored),
            }
        }

    def load_state_dict(
        self, tensors: dict[str, Tensor], state: dict[str, Any], budget: float | None = None
    ) -> None:
        """Restore :meth:`state_dict` (other keys of the ``counters`` record are ignored), checked
        first (:func:`check_schedule_state`): a bad state changes nothing. A file saved before
        the allowance was kept earned ``budget`` times its serving time (the rule then); one
        saved before the learning schedule starts it at the warm-up ratio with no learning
        counted (``LATER_KEYS``)."""
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
        self.taper = int(counters.get("taper", 0))
        best = counters.get("best_loss")
        self.best_loss = None if best is None else float(best)
        self.window_loss = float(counters.get("window_loss", 0.0))
        self.window_rows = int(counters.get("window_rows", 0))
        self.train_macs = int(counters.get("train_macs", 0))
        self.calibration_macs = int(counters.get("calibration_macs", 0))
        self.block = [int(v) for v in counters.get("cost_block", [0, 0, 0])]
        self.last_block = [int(v) for v in counters.get("cost_last_block", [0, 0, 0])]
        # Older files: what was learned was within the budget of its day, nothing is owed back.
        earned_macs = counters.get("allowance_macs")
        self.allowance_macs = (
            float(self.train_macs + self.calibration_macs)
            if earned_macs is None
            else float(earned_macs)
        )
        self.scored = [int(v) for v in counters.get("scored", [-1, -1, 0])]


#: Keys of the ``counters`` record a :class:`Schedule` saves.
SAVED_KEYS = ("calibrations", "last_calibration", "serve_seconds", "learn_seconds", "epoch")
#: Saved since (older files lack them: the allowance is then rebuilt from the budget and the
#: serving time; the learning schedule starts at the warm-up ratio, its cost counts at 0).
LATER_KEYS = (
    "allowance_seconds",
    "first_open_sample",
    "taper",
    "best_loss",
    "window_loss",
    "window_rows",
    "train_macs",
    "calibration_macs",
    "cost_block",
    "cost_last_block",
    "allowance_macs",
    "scored",
)


def check_schedule_state(state: Any) -> None:
    """Check the saved counts and clocks of :meth:`Schedule.state_dict`: integers >= 0, finite
    seconds and losses >= 0, the taper within ``MAX_TAPER``, cost blocks of three integers.
    Raises a :class:`~earlyexit.CheckpointError` naming the field.

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
    # The learning schedule's keys may be absent (older files); present, they must be right.
    if counters.get("best_loss", None) is not None:  # None: no window closed yet
        expect_number(counters["best_loss"], "counters.best_loss", low=0.0)
    if counters.get("allowance_macs") is not None:
        expect_number(counters["allowance_macs"], "counters.allowance_macs", low=0.0)
    if "window_loss" in counters:
        expect_number(counters["window_loss"], "counters.window_loss", low=0.0)
    if "taper" in counters:
        expect_int(counters["taper"], "counters.taper", 0, MAX_TAPER)
    for key in ("window_rows", "train_macs", "calibration_macs"):
        if key in counters:
            expect_int(counters[key], f"counters.{key}")
    for key in ("cost_block", "cost_last_block"):
        if key in counters:
            for i, value in enumerate(expect_list(counters[key], f"counters.{key}", 3)):
                expect_int(value, f"counters.{key}[{i}]")
    if "scored" in counters:
        for i, value in enumerate(expect_list(counters["scored"], "counters.scored", 3)):
            expect_int(value, f"counters.scored[{i}]", low=-1 if i < 2 else 0)


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
