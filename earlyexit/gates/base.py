"""The gate interface and the hand-made gates.

A sample leaves at exit ``i`` when ``gate.score(...) >= thresholds[i]``. Higher scores mean more
confident. Calibration only ever sees scores, so every gate is calibrated the same way.

The score gates (:class:`MaxSoftmaxGate`, :class:`MarginGate`, :class:`EntropyGate`,
:class:`GiniGate`) look only at the current head's logits, through the functions of
:data:`~earlyexit.gates.scores.CONFIDENCE_SCORES`. Two gates look back at earlier heads
(``needs_history``): :class:`AgreementGate` (the cascade-of-ensembles rule: the current head and the
previous ``k`` heads vote) and :class:`PatienceGate` (PABEE: the prediction stayed the same for
``t`` exits). Both turn their rule into a *score*, so their thresholds are calibrated like any other
gate's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError
from .scores import CONFIDENCE_SCORES, NON_NEGATIVE_SCORES, agreement_score, patience_score


@dataclass
class GateContext:
    """What a gate may look at besides the current logits.

    Attributes:
        exit_index: which exit is deciding (``num_exits`` for the final classifier).
        rows: ``[R]`` int64, the input rows (positions in the caller's batch) of the running samples.
        history: logits of the heads evaluated earlier for these same rows, in exit order; ``None``
            where an exit's head was not evaluated. Filled only for gates with ``needs_history``.
        members: for an ensemble tier of a :class:`~earlyexit.cascade.Cascade`, the logits of each
            member whose combination is being scored (``None`` elsewhere).
    """

    exit_index: int
    rows: Tensor
    history: Sequence[Tensor | None] = field(default_factory=list)
    members: Sequence[Tensor] | None = None


def distrust_non_finite(scores: Tensor, logits: Tensor) -> Tensor:
    """``scores`` with NaN where a row of ``logits`` is not all finite: a NaN score passes no gate
    (``scores >= threshold`` is False), so no answer is given on such logits.

    Example:
        >>> distrust_non_finite(torch.tensor([0.9, 0.8]), torch.tensor([[1.0, 0.0], [math.inf, 0.0]]))
        tensor([0.9000,    nan])
    """
    return scores.masked_fill(~torch.isfinite(logits).all(dim=-1), math.nan)


class Gate:
    """Base class: subclasses implement :meth:`score`.

    ``needs_history = True`` asks the wrapper to evaluate (and remember) every earlier head, even
    where that exit's own gate is closed.

    Example:
        >>> class AlwaysSure(Gate):
        ...     name = "always_sure"
        ...     def score(self, logits, ctx):
        ...         return torch.ones(logits.shape[0])
    """

    name: ClassVar[str] = "custom"
    # Not a ClassVar: a gate may decide per instance (e.g. LearnedGate, only when fitted with history).
    needs_history: bool = False
    #: True when non-finite logits always get a NaN score from :meth:`score` (softmax-based
    #: scores do), so :meth:`checked_score` need not look at the logits again on every call.
    propagates_non_finite: ClassVar[bool] = False

    def score(self, logits: Tensor, ctx: GateContext) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def history_sources(self, num_exits: int) -> tuple[bool, ...]:
        """Per exit, whether this gate reads that exit's head as history: serving runs such a
        head whenever a later gate is open, even where its own gate is closed. The default: every
        head when :attr:`needs_history`, none otherwise. A gate that reads fewer heads (e.g. a
        :class:`~earlyexit.gates.LearnedGate` that skips switched-off exits) saves their cost.

        Example:
            >>> PatienceGate().history_sources(3)
            (True, True, True)
        """
        return (bool(self.needs_history),) * num_exits

    def checked_score(self, logits: Tensor, ctx: GateContext) -> Tensor:
        """The float32 score serving and calibration compare with a threshold: :meth:`score`, NaN
        wherever a row of ``logits`` is not finite: a NaN score passes no gate, so no answer is
        given on such logits, whatever the gate makes of them (argmax-based gates such as
        patience would score them as usual).

        Example:
            >>> logits = torch.tensor([[2.0, 0.0], [math.nan, 0.0]])
            >>> PatienceGate().checked_score(logits, GateContext(1, torch.arange(2), [logits]))
            tensor([1., nan])
        """
        scores = self.score(logits, ctx).float()
        return scores if self.propagates_non_finite else distrust_non_finite(scores, logits)

    def config(self) -> dict:
        """JSON-serialisable description (saved with the heads)."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _ScoreGate(Gate):
    """A gate that is a plain function of the current logits: the entry of
    :data:`~earlyexit.gates.scores.CONFIDENCE_SCORES` named like the gate.

    Subclasses only give the ``name``; the function is looked up once, when the class is made.
    Every such score goes through a softmax, which turns a non-finite row into NaN.
    """

    propagates_non_finite = True

    _score_fn: ClassVar[Callable[[Tensor], Tensor]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._score_fn = staticmethod(CONFIDENCE_SCORES[cls.name])

    def score(self, logits: Tensor, ctx: GateContext) -> Tensor:
        return type(self)._score_fn(logits)


class MaxSoftmaxGate(_ScoreGate):
    """Exit when the largest softmax probability reaches the threshold (the classic rule)."""

    name = "max_softmax"


class MarginGate(_ScoreGate):
    """Exit when top-1 minus top-2 probability reaches the threshold."""

    name = "margin"


class EntropyGate(_ScoreGate):
    """Exit when the negative entropy reaches the threshold (low entropy = confident)."""

    name = "entropy"


class GiniGate(_ScoreGate):
    """Exit when the sum of squared probabilities reaches the threshold (DeepGini)."""

    name = "gini"


class AgreementGate(Gate):
    """Exit when the current head and the previous ``k`` heads agree (cascade of ensembles).

    The score is the vote share of the current argmax among those ``k + 1`` heads (see
    :func:`~earlyexit.gates.scores.agreement_score`); with ``confidence`` (``"max_softmax"``,
    ``"margin"`` or ``"gini"``) it is multiplied by that confidence of the current head, so ties
    between equal vote shares are broken by how sure the head is and thresholds have more than
    ``k + 1`` levels to choose from. On an ensemble tier of a cascade the members vote instead.

    Example:
        >>> gate = AgreementGate(k=1)
        >>> ctx = GateContext(1, torch.arange(1), [torch.tensor([[1.0, 0.0]])])
        >>> gate.score(torch.tensor([[2.0, 0.0]]), ctx).tolist()
        [1.0]
    """

    name = "agreement"
    needs_history = True

    def __init__(self, k: int = 2, confidence: str | None = None) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ConfigError(f"agreement k must be a non-negative int, got {k!r}")
        if confidence is not None and confidence not in NON_NEGATIVE_SCORES:
            raise ConfigError(
                "agreement confidence must be None or one of "
                f"{', '.join(sorted(NON_NEGATIVE_SCORES))}, got {confidence!r}"
            )
        self.k = k
        self.confidence = confidence

    def score(self, logits: Tensor, ctx: GateContext) -> Tensor:
        share = agreement_score(logits, ctx.history, self.k, members=ctx.members)
        if self.confidence is None:
            return share
        return share * CONFIDENCE_SCORES[self.confidence](logits)

    def config(self) -> dict:
        return {"name": self.name, "k": self.k, "confidence": self.confidence}

    def __repr__(self) -> str:
        return f"AgreementGate(k={self.k}, confidence={self.confidence!r})"


class PatienceGate(Gate):
    """Exit once the prediction has not changed for ``threshold`` consecutive exits (PABEE).

    The score is the patience counter (:func:`~earlyexit.gates.scores.patience_score`), an
    integer, so a threshold of ``t`` is PABEE's patience ``t``. Exit 0 always scores 0 (nothing to
    agree with).

    Example:
        >>> gate = PatienceGate()
        >>> ctx = GateContext(2, torch.arange(1), [torch.tensor([[1.0, 0.0]])] * 2)
        >>> gate.score(torch.tensor([[2.0, 0.0]]), ctx).tolist()
        [2.0]
    """

    name = "patience"
    needs_history = True

    def score(self, logits: Tensor, ctx: GateContext) -> Tensor:
        return patience_score(logits, ctx.history)


__all__ = [
    "AgreementGate",
    "EntropyGate",
    "Gate",
    "GateContext",
    "GiniGate",
    "MarginGate",
    "MaxSoftmaxGate",
    "PatienceGate",
]
