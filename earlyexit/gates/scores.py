"""Score functions: how sure a head is, as one number per sample (higher = more confident).

Plain functions of logits (and, for the two look-back rules, of earlier heads' logits). The gates
(:mod:`earlyexit.gates.base`) bind them to the :class:`~earlyexit.gates.Gate` interface, and the
final supervisor (:mod:`earlyexit.supervisors`) scores the full model's output with the same
table, :data:`CONFIDENCE_SCORES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import torch
from torch import Tensor

from ..errors import ConfigError


def max_softmax_score(logits: Tensor) -> Tensor:
    """Largest softmax probability, in [1/K, 1].

    Example:
        >>> max_softmax_score(torch.tensor([[0.0, 0.0]])).tolist()
        [0.5]
    """
    return logits.float().softmax(dim=-1).amax(dim=-1)


def margin_score(logits: Tensor) -> Tensor:
    """Top-1 minus top-2 softmax probability (the prediction-confidence score), in [0, 1].

    Example:
        >>> margin_score(torch.tensor([[0.0, 0.0]])).tolist()
        [0.0]
    """
    probs = logits.float().softmax(dim=-1)
    if probs.shape[-1] < 2:
        return probs[..., 0]
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def neg_entropy_score(logits: Tensor) -> Tensor:
    """Negative entropy of the softmax, in [-log K, 0]: 0 for a one-hot prediction.

    Example:
        >>> round(neg_entropy_score(torch.tensor([[0.0, 0.0]])).item(), 4)  # -log 2
        -0.6931
    """
    log_probs = logits.float().log_softmax(dim=-1)
    return (log_probs.exp() * log_probs).sum(dim=-1)


def gini_score(logits: Tensor) -> Tensor:
    """Sum of squared softmax probabilities (1 minus DeepGini's impurity), in [1/K, 1].

    Example:
        >>> gini_score(torch.tensor([[0.0, 0.0]])).tolist()
        [0.5]
    """
    probs = logits.float().softmax(dim=-1)
    return (probs * probs).sum(dim=-1)


CONFIDENCE_SCORES: Mapping[str, Callable[[Tensor], Tensor]] = MappingProxyType(
    {
        "entropy": neg_entropy_score,
        "gini": gini_score,
        "margin": margin_score,
        "max_softmax": max_softmax_score,
    }
)
"""The scores of one head's own logits, by the name gates and supervisors use for them."""

NON_NEGATIVE_SCORES: tuple[str, ...] = ("gini", "margin", "max_softmax")
"""The names in :data:`CONFIDENCE_SCORES` whose scores are never negative: only these can weight
a vote share (:class:`~earlyexit.gates.AgreementGate`'s ``confidence``), since multiplying by a
negative score (``entropy``) would reverse the order of the shares."""


def agreement_score(
    logits: Tensor,
    history: Sequence[Tensor | None] = (),
    k: int = 2,
    *,
    members: Sequence[Tensor] | None = None,
) -> Tensor:
    """Vote share of the current argmax among the current head and the previous ``k`` heads.

    The denominator is always ``k + 1``: a head that was not evaluated (``None``) or does not exist
    (the first exits) counts as a vote *against*, so a score of 1 means ``k + 1`` heads really
    agreed, and the first exit can score at most ``1 / (k + 1)``. With ``members`` (an ensemble
    tier) the vote is among the members instead, as in the cascade-of-ensembles rule, with a
    denominator of ``len(members)``.

    Example:
        >>> cur = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> prev = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> [round(v, 3) for v in agreement_score(cur, [prev, None], k=2).tolist()]  # 2/3, 1/3
        [0.667, 0.333]
    """
    pred = logits.argmax(dim=-1)
    if members is not None:
        if len(members) == 0:
            raise ConfigError("an ensemble needs at least one member to vote")
        votes = sum((m.argmax(dim=-1) == pred).float() for m in members)
        return votes / len(members)
    if k < 0:
        raise ConfigError(f"agreement k must be >= 0, got {k}")
    votes = torch.ones(pred.shape, dtype=torch.float32, device=pred.device)
    for past in list(history)[-k:] if k > 0 else []:
        if past is not None:
            votes = votes + (past.argmax(dim=-1) == pred).float()
    return votes / (k + 1)


def patience_score(logits: Tensor, history: Sequence[Tensor | None] = ()) -> Tensor:
    """How many consecutive earlier heads, counting back from the last one, predicted the current
    argmax (PABEE's patience counter): threshold ``t`` exits once the prediction has stayed the same
    for the current head and the ``t`` heads before it. A head that was not evaluated (``None``)
    ends the streak (its vote is unknown).

    Example:
        >>> a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]])
        >>> patience_score(a, [b, a, a]).tolist()  # the last two agree, the one before does not
        [2.0]
    """
    pred = logits.argmax(dim=-1)
    count = torch.zeros(pred.shape, dtype=torch.float32, device=pred.device)
    alive = torch.ones(pred.shape, dtype=torch.bool, device=pred.device)
    for past in reversed(list(history)):
        if past is None:
            break
        alive = alive & (past.argmax(dim=-1) == pred)
        if not bool(alive.any()):
            break
        count = count + alive.float()
    return count


__all__ = [
    "CONFIDENCE_SCORES",
    "NON_NEGATIVE_SCORES",
    "agreement_score",
    "gini_score",
    "margin_score",
    "max_softmax_score",
    "neg_entropy_score",
    "patience_score",
]
