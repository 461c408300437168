"""The final supervisor (supervisor 2 of BiSupervised): how far even the full model can be trusted.

It scores the full model's logits with the same score functions as the gates and accepts a
prediction when the score reaches its threshold. A new supervisor accepts everything
(threshold ``-inf``) until a threshold is set or calibrated.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

from .errors import ConfigError
from .gates import gini_score, margin_score, max_softmax_score, neg_entropy_score

_SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "entropy": neg_entropy_score,
    "gini": gini_score,
    "margin": margin_score,
    "max_softmax": max_softmax_score,
}


class Supervisor:
    """Accepts a full-model prediction when ``score(logits) >= threshold``.

    Example:
        >>> import torch
        >>> sup = Supervisor("max_softmax", threshold=0.5)
        >>> sup.accept(torch.tensor([[5.0, 0.0], [0.1, 0.0]])).tolist()
        [True, False]
    """

    def __init__(self, score: str = "max_softmax", threshold: float = -math.inf) -> None:
        if score not in _SCORES:
            raise ConfigError(
                f"unknown supervisor score {score!r}; choose one of {', '.join(sorted(_SCORES))}"
            )
        self.name = score
        self.threshold = float(threshold)

    def score(self, logits: Tensor) -> Tensor:
        """Per-sample trust score of the full model's logits (higher = more trustworthy)."""
        return _SCORES[self.name](logits)

    def accept(self, logits: Tensor) -> Tensor:
        """``[B]`` bool: True where the prediction is trusted."""
        return self.score(logits) >= self.threshold

    def config(self) -> dict:
        """JSON-serialisable description (saved with the heads)."""
        return {"name": self.name, "threshold": self.threshold}

    def __repr__(self) -> str:
        return f"Supervisor({self.name!r}, threshold={self.threshold})"


def make_supervisor(supervisor: str | Supervisor | dict | None) -> Supervisor | None:
    """A :class:`Supervisor` from a score name, a saved config, an object, or ``None`` (no supervisor)."""
    if supervisor is None or isinstance(supervisor, Supervisor):
        return supervisor
    if isinstance(supervisor, str):
        return Supervisor(supervisor)
    if isinstance(supervisor, dict):
        return Supervisor(
            supervisor.get("name", "max_softmax"), supervisor.get("threshold", -math.inf)
        )
    raise ConfigError(
        f"supervisor must be a score name, a Supervisor or None, got {type(supervisor).__name__}"
    )


__all__ = ["Supervisor", "make_supervisor"]
