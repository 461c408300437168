"""Exit routing: given gate scores and thresholds, who leaves where, and what each path costs.

This is the one implementation of the exit rule, shared by every place that applies it:

* live serving (:class:`~earlyexit.model.EarlyExitModel` hooks, :class:`~earlyexit.cascade.Cascade`
  tiers) asks :func:`leaves` at each exit for the rows still running;
* offline replay (calibration, placement, stream evaluation, cascade simulation) asks
  :func:`simulate_exits` for a whole ``[N, E]`` score matrix at once;
* costs: :func:`heads_evaluated` says which heads serving runs under a set of open gates and
  :func:`exit_path_macs` what a sample pays on each path (heads run on the way included).

The rule: a sample leaves at the first exit whose score is ``>=`` that exit's threshold; ``inf``
never passes (a closed gate), ``-inf`` always does, a NaN score never does. Scores are compared in
their own dtype (a Python float threshold against float32 scores compares in float32), so live
serving and replay take the same decision for the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import ConfigError


def check_thresholds(
    values: Sequence[float], count: int, *, per: str = "exit"
) -> tuple[float, ...]:
    """Validate ``count`` thresholds (numbers, no NaN) and return them as a tuple of floats.

    ``per`` names what each threshold belongs to, for the error message.

    Example:
        >>> check_thresholds([0.9, float("inf")], 2)
        (0.9, inf)
    """
    values = list(values)
    if len(values) != count:
        raise ConfigError(f"expected {count} thresholds (one per {per}), got {len(values)}")
    checked = []
    for i, value in enumerate(values):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"threshold {i} must be a number, got {value!r}") from None
        if math.isnan(value):
            raise ConfigError(f"threshold {i} is NaN; use inf to close that {per}")
        checked.append(value)
    return tuple(checked)


def gates_open(thresholds: Sequence[float]) -> tuple[bool, ...]:
    """Which gates can let a sample out: every threshold but ``inf``.

    Example:
        >>> gates_open([0.9, float("inf")])
        (True, False)
    """
    return tuple(float(t) != math.inf for t in thresholds)


def heads_evaluated(
    open_gates: Sequence[bool], needs_history: bool | Sequence[bool]
) -> tuple[bool, ...]:
    """Which heads serving runs: those whose gate is open, and those a later open gate looks back
    at. ``needs_history``: ``True`` when the gate looks back at every earlier head (then every head
    up to the last open gate runs), ``False`` when it looks at none, or one bool per exit saying
    whose heads it reads (see :meth:`~earlyexit.gates.Gate.history_sources`): a head that no
    gate reads and whose own gate is closed (e.g. a switched-off exit) never runs.

    Example:
        >>> heads_evaluated([False, True, False], needs_history=True)
        (True, True, False)
        >>> heads_evaluated([False, False, True], needs_history=[False, True, True])
        (False, True, True)
    """
    gates = list(open_gates)
    if isinstance(needs_history, bool):
        sources = [needs_history] * len(gates)
    else:
        sources = [bool(s) for s in needs_history]
        if len(sources) != len(gates):
            raise ConfigError(
                f"expected one history source flag per exit ({len(gates)}), got {len(sources)}"
            )
    return tuple(gates[i] or (sources[i] and any(gates[i + 1 :])) for i in range(len(gates)))


def exit_path_macs(
    backbone_macs: Sequence[int],
    head_macs: Sequence[int],
    base_macs: int,
    evaluated: Sequence[bool],
) -> tuple[int, ...]:
    """Per-sample MACs of leaving at each exit (last entry: running to the end) when the heads in
    ``evaluated`` run on the way.

    Example:
        >>> exit_path_macs([10, 20], [1, 1], 30, [True, False])
        (11, 21, 31)
    """
    costs, spent = [], 0
    for backbone, head, runs in zip(backbone_macs, head_macs, evaluated, strict=True):
        spent += head if runs else 0
        costs.append(int(backbone) + spent)
    costs.append(int(base_macs) + spent)
    return tuple(costs)


def leaves(scores: Tensor, threshold: float) -> Tensor:
    """``[B]`` bool: which of the rows scored ``scores`` at one exit leave there.

    Example:
        >>> leaves(torch.tensor([0.2, 0.9]), 0.5).tolist()
        [False, True]
    """
    return scores >= threshold


def first_exit(passed: Tensor) -> Tensor:
    """``[N]`` int64 index of the first True of each row of ``passed`` ``[N, E]``; ``E`` where none
    (the sample runs to the end).

    Example:
        >>> first_exit(torch.tensor([[False, True], [False, False]])).tolist()
        [1, 2]
    """
    n, e = passed.shape
    if e == 0:
        return torch.zeros(n, dtype=torch.long)
    index = torch.arange(e, device=passed.device).expand(n, e)
    return torch.where(passed, index, torch.full_like(index, e)).amin(1)


def simulate_exits(scores: Tensor, thresholds: Sequence[float]) -> Tensor:
    """Where each sample leaves under ``thresholds``: ``[N]`` int64 on the CPU, ``E`` = ran to the
    end. The same decision as serving: the first exit whose score passes (see :func:`leaves`).

    Example:
        >>> simulate_exits(torch.tensor([[0.9, 0.1], [0.2, 0.95], [0.1, 0.1]]), [0.8, 0.9]).tolist()
        [0, 1, 2]
    """
    e = scores.shape[1]
    if len(thresholds) != e:
        raise ConfigError(f"expected {e} thresholds (one per score column), got {len(thresholds)}")
    values = scores.detach().cpu()
    limits = torch.tensor([float(t) for t in thresholds], dtype=values.dtype)
    return first_exit(values >= limits)


def scatter_answers(
    answers: Sequence[tuple[Tensor, Tensor, int, Tensor]],
    batch: int,
    *,
    num_classes: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """Put answers given per exit back in the caller's row order.

    ``answers``: per answering exit, ``(rows, logits, exit_index, scores)``; every row of the batch
    is answered exactly once. Returns ``(logits [B, K], exit_index [B], confidence [B] float32)``.

    Example:
        >>> out = scatter_answers([(torch.tensor([1]), torch.ones(1, 2), 0, torch.ones(1)),
        ...                        (torch.tensor([0]), torch.zeros(1, 2), 1, torch.zeros(1))],
        ...                       2, num_classes=2, dtype=torch.float32, device=torch.device("cpu"))
        >>> out[1].tolist()
        [1, 0]
    """
    logits = torch.empty(batch, num_classes, dtype=dtype, device=device)
    exit_index = torch.empty(batch, dtype=torch.long, device=device)
    confidence = torch.empty(batch, dtype=torch.float32, device=device)
    for rows, part, index, scores in answers:
        logits[rows] = part.to(dtype)
        exit_index[rows] = index
        confidence[rows] = scores
    return logits, exit_index, confidence


__all__ = [
    "check_thresholds",
    "exit_path_macs",
    "first_exit",
    "gates_open",
    "heads_evaluated",
    "leaves",
    "scatter_answers",
    "simulate_exits",
]
