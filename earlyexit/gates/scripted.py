"""A gate that follows a plan instead of judging: forced exit mixes for measurements.

:class:`ScriptedExitGate` makes chosen rows leave at chosen exits, so the cost of a given exit mix
(which share of a batch leaves where) can be timed with real serving (only open exits' heads run),
e.g. by :func:`earlyexit.evaluation.latency.bench_exit_mixes`. It is not registered by name: it
needs a plan.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Gate, GateContext


class ScriptedExitGate(Gate):
    """A gate that follows a plan: caller row ``r`` leaves at exit ``plan[r]`` (``E``: runs to the end).

    Set the wrapper's thresholds to ``0.5`` at every exit used by the plan and ``inf`` elsewhere
    (:meth:`thresholds_for`); the score is 1 for planned rows and 0 for the others, so the exits
    happen exactly as planned and only the heads of open exits run, as in real serving.

    Example:
        >>> gate = ScriptedExitGate()
        >>> gate.plan = torch.tensor([0, 2, 4])
        >>> gate.thresholds_for(4)
        [0.5, inf, 0.5, inf]
    """

    name = "scripted_exit"

    def __init__(self) -> None:
        self.plan = torch.zeros(0, dtype=torch.long)

    def score(self, logits: Tensor, ctx: GateContext) -> Tensor:
        plan = self.plan.to(ctx.rows.device)
        return (plan[ctx.rows] == ctx.exit_index).float()

    def thresholds_for(self, num_exits: int) -> list[float]:
        used = set(self.plan.tolist())
        return [0.5 if i in used else math.inf for i in range(num_exits)]


__all__ = ["ScriptedExitGate"]
