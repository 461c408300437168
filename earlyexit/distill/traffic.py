"""Counts of served traffic: where samples left, what they cost, how audited answers fared.

:class:`TrafficCounters` is plain ints (saved with the learner); it also keeps the window of the
latest batches behind the *recent* exit rates and MAC saving of ``OnlineDistiller.stats()``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._checks import expect_dict, expect_int, expect_list, field_error

#: Served samples the exit rates and MAC saving of ``OnlineDistiller.stats`` look back on.
STATS_WINDOW = 2048

#: Keys of :class:`TrafficCounters` in the ``counters`` record of a saved learner.
SAVED_KEYS = (
    "samples",
    "exits",
    "exits_since_publish",
    "samples_since_publish",
    "audited",
    "audited_agree",
    "audited_since_publish",
    "audited_agree_since_publish",
    "macs",
    "macs_since_publish",
)
#: Counters added since version 1 was first written: absent from older files (read as 0).
LATER_KEYS = ("non_finite_dropped",)


@dataclass
class TrafficCounters:
    """Everything counted about served traffic, all time and since the last publish.

    Example:
        >>> counters = TrafficCounters.empty(num_exits=2)
        >>> counters.record_batch([3, 0, 1], spent=40)
        >>> counters.samples, counters.exits, counters.recent_exit_rates()
        (4, [3, 0, 1], [0.75, 0.0])
    """

    num_exits: int
    samples: int = 0
    exits: list[int] = field(default_factory=list)  # per path (E + 1), all time
    exits_since_publish: list[int] = field(default_factory=list)
    samples_since_publish: int = 0
    audited: list[int] = field(default_factory=list)  # audited early exits per exit, all time
    audited_agree: list[int] = field(default_factory=list)
    audited_since_publish: list[int] = field(default_factory=list)
    audited_agree_since_publish: list[int] = field(default_factory=list)
    macs: int = 0  # serving MACs actually spent (audited samples at full cost)
    macs_since_publish: int = 0
    # Rows that ran to the end with a non-finite teacher or features: served flagged, never learned.
    non_finite_dropped: int = 0
    # (samples, per-path counts, MACs) of the latest batches: recent exit rates and saving.
    recent: deque[tuple[int, list[int], int]] = field(default_factory=deque)
    recent_samples: int = 0

    @classmethod
    def empty(cls, num_exits: int) -> TrafficCounters:
        """Zero counts for a model with ``num_exits`` exits."""
        counters = cls(
            num_exits,
            exits=[0] * (num_exits + 1),
            audited=[0] * num_exits,
            audited_agree=[0] * num_exits,
        )
        counters.reset_publish()
        return counters

    def reset_publish(self) -> None:
        """Start the *since publish* counts afresh (new heads or thresholds are served)."""
        self.exits_since_publish = [0] * (self.num_exits + 1)
        self.samples_since_publish = 0
        self.audited_since_publish = [0] * self.num_exits
        self.audited_agree_since_publish = [0] * self.num_exits
        self.macs_since_publish = 0

    def record_batch(self, counts: list[int], spent: int) -> None:
        """One served batch: ``counts`` samples per path (E + 1), ``spent`` MACs in all."""
        batch = sum(counts)
        for i, n in enumerate(counts):
            self.exits[i] += n
            self.exits_since_publish[i] += n
        self.samples += batch
        self.samples_since_publish += batch
        self.macs += spent
        self.macs_since_publish += spent
        self.recent.append((batch, counts, spent))
        self.recent_samples += batch
        while self.recent_samples - self.recent[0][0] >= STATS_WINDOW:
            self.recent_samples -= self.recent.popleft()[0]

    def record_audit(self, exit_: int, agreed: bool) -> None:
        """An audited early answer at ``exit_``, and whether the full model agreed."""
        self.audited[exit_] += 1
        self.audited_since_publish[exit_] += 1
        self.audited_agree[exit_] += agreed
        self.audited_agree_since_publish[exit_] += agreed

    def recent_exit_rates(self) -> list[float]:
        """Share of the latest ~``STATS_WINDOW`` samples that left at each exit."""
        recent = max(self.recent_samples, 1)
        return [
            sum(counts[e] for _, counts, _ in self.recent) / recent for e in range(self.num_exits)
        ]

    def recent_mac_saving(self, base_macs: int) -> float:
        """1 - MACs spent on the latest ~``STATS_WINDOW`` samples over the base model's."""
        if not self.recent_samples:
            return 0.0
        recent_macs = sum(m for _, _, m in self.recent)
        return 1.0 - recent_macs / (max(self.recent_samples, 1) * base_macs)

    def total_exit_rates(self) -> list[float]:
        """Share of all samples ever served that left at each exit."""
        return [self.exits[e] / max(self.samples, 1) for e in range(self.num_exits)]

    def total_mac_saving(self, base_macs: int) -> float:
        """1 - MACs spent on every sample ever served over the base model's."""
        return 1.0 - self.macs / (self.samples * base_macs) if self.samples else 0.0

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """No tensors; the saved counts (JSON, in the shared ``counters`` record) and the recent
        window (``recent``: ``[samples, per-path counts, MACs]`` per batch, oldest first)."""
        counters = {key: getattr(self, key) for key in (*SAVED_KEYS, *LATER_KEYS)}
        recent = [[batch, list(counts), spent] for batch, counts, spent in self.recent]
        return {}, {"counters": counters, "recent": recent}

    def load_state_dict(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (other keys of the ``counters`` record are ignored). A
        state without ``recent`` (saved before it was kept) starts an empty window; one without
        a counter of :data:`LATER_KEYS` starts it at 0. Checked first
        (:func:`check_traffic_state`): a bad state changes nothing."""
        check_traffic_state(state, self.num_exits)
        counters = state["counters"]
        for key in SAVED_KEYS:
            value = counters[key]
            setattr(self, key, list(value) if isinstance(value, list) else int(value))
        for key in LATER_KEYS:
            setattr(self, key, int(counters.get(key, 0)))
        self.recent = deque(
            (int(batch), [int(n) for n in counts], int(spent))
            for batch, counts, spent in state.get("recent", [])
        )
        self.recent_samples = sum(batch for batch, _, _ in self.recent)


def check_traffic_state(state: Any, num_exits: int) -> None:
    """Check the saved counts of :meth:`TrafficCounters.state_dict` for ``num_exits`` exits:
    integers >= 0, per-path lists of ``num_exits + 1`` and per-exit lists of ``num_exits``, a
    recent window whose per-path counts add up to each batch. Raises a
    :class:`~earlyexit.CheckpointError` naming the field.

    Example:
        >>> check_traffic_state(TrafficCounters.empty(2).state_dict()[1], num_exits=2)
    """
    counters = expect_dict(expect_dict(state, "state", ("counters",))["counters"], "counters")
    expect_dict(counters, "counters", SAVED_KEYS)
    lengths = {"exits": num_exits + 1, "exits_since_publish": num_exits + 1}
    for key in SAVED_KEYS:
        if key in ("samples", "samples_since_publish", "macs", "macs_since_publish"):
            expect_int(counters[key], f"counters.{key}")
            continue
        values = expect_list(counters[key], f"counters.{key}", lengths.get(key, num_exits))
        for i, value in enumerate(values):
            expect_int(value, f"counters.{key}[{i}]")
    for key in LATER_KEYS:
        if key in counters:
            expect_int(counters[key], f"counters.{key}")
    for i, entry in enumerate(expect_list(state.get("recent", []), "recent")):
        batch, counts, spent = expect_list(entry, f"recent[{i}]", 3)
        expect_int(batch, f"recent[{i}][0]")
        for j, n in enumerate(expect_list(counts, f"recent[{i}][1]", num_exits + 1)):
            expect_int(n, f"recent[{i}][1][{j}]")
        if sum(counts) != batch:
            raise field_error(f"recent[{i}][1]", f"per-path counts adding up to {batch}", counts)
        expect_int(spent, f"recent[{i}][2]")


def spent_macs(
    exit_index: Tensor, audited_full: Tensor, path_macs: Sequence[int], num_exits: int
) -> int:
    """MACs of the path each sample took; an audited early exit also ran to the end.

    Example:
        >>> spent_macs(torch.tensor([0, 1, 0]), torch.tensor([True, False, False]), [1, 5, 9], 2)
        15
    """
    taken = torch.where(audited_full, num_exits, exit_index)
    return int(torch.tensor(path_macs, dtype=torch.long)[taken].sum())
