"""Gates (supervisor 1 at each exit): a score per sample from a head's logits.

A sample leaves at exit ``i`` when ``gate.score(...) >= thresholds[i]``. Higher scores mean more
confident. Calibration only ever sees scores, so every gate is calibrated the same way.

The maths lives in plain functions (``max_softmax_score`` ...), the classes only bind them to the
:class:`Gate` interface; :func:`make_gate` turns a name into a gate.

Two gates look back at earlier heads (``needs_history``): :class:`AgreementGate` (the
cascade-of-ensembles rule: the current head and the previous ``k`` heads vote) and
:class:`PatienceGate` (PABEE: the prediction stayed the same for ``t`` exits). Both turn their rule
into a *score*, so their thresholds are calibrated like any other gate's. :func:`gate_scores`
computes any gate's per-exit scores offline from a ``[N, E, K]`` stack of recorded head logits,
exactly as serving would, so trade-off curves of every gate can be drawn from one recorded stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .errors import ConfigError


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


def max_softmax_score(logits: Tensor) -> Tensor:
    """Largest softmax probability, in [1/K, 1]."""
    return logits.float().softmax(dim=-1).amax(dim=-1)


def margin_score(logits: Tensor) -> Tensor:
    """Top-1 minus top-2 softmax probability (the prediction-confidence score), in [0, 1]."""
    probs = logits.float().softmax(dim=-1)
    if probs.shape[-1] < 2:
        return probs[..., 0]
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def neg_entropy_score(logits: Tensor) -> Tensor:
    """Negative entropy of the softmax, in [-log K, 0]: 0 for a one-hot prediction."""
    log_probs = logits.float().log_softmax(dim=-1)
    return (log_probs.exp() * log_probs).sum(dim=-1)


def gini_score(logits: Tensor) -> Tensor:
    """Sum of squared softmax probabilities (1 minus DeepGini's impurity), in [1/K, 1]."""
    probs = logits.float().softmax(dim=-1)
    return (probs * probs).sum(dim=-1)


_CONFIDENCE: dict[str, Callable[[Tensor], Tensor]] = {
    "max_softmax": max_softmax_score,
    "margin": margin_score,
    "gini": gini_score,
}


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
    needs_history: ClassVar[bool] = False

    def score(self, logits: Tensor, ctx: GateContext) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-serialisable description (saved with the heads)."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _ScoreGate(Gate):
    """A gate that is a plain function of the current logits."""

    fn: ClassVar[Callable[[Tensor], Tensor]]

    def score(self, logits: Tensor, ctx: GateContext) -> Tensor:
        return type(self).fn(logits)


class MaxSoftmaxGate(_ScoreGate):
    """Exit when the largest softmax probability reaches the threshold (the classic rule)."""

    name = "max_softmax"
    fn = staticmethod(max_softmax_score)


class MarginGate(_ScoreGate):
    """Exit when top-1 minus top-2 probability reaches the threshold."""

    name = "margin"
    fn = staticmethod(margin_score)


class EntropyGate(_ScoreGate):
    """Exit when the negative entropy reaches the threshold (low entropy = confident)."""

    name = "entropy"
    fn = staticmethod(neg_entropy_score)


class GiniGate(_ScoreGate):
    """Exit when the sum of squared probabilities reaches the threshold (DeepGini)."""

    name = "gini"
    fn = staticmethod(gini_score)


class AgreementGate(Gate):
    """Exit when the current head and the previous ``k`` heads agree (cascade of ensembles).

    The score is the vote share of the current argmax among those ``k + 1`` heads (see
    :func:`agreement_score`); with ``confidence`` (``"max_softmax"``, ``"margin"`` or ``"gini"``) it
    is multiplied by that confidence of the current head, so ties between equal vote shares are
    broken by how sure the head is and thresholds have more than ``k + 1`` levels to choose from.
    On an ensemble tier of a cascade the members vote instead.

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
        if confidence is not None and confidence not in _CONFIDENCE:
            raise ConfigError(
                f"agreement confidence must be None or one of {', '.join(sorted(_CONFIDENCE))}, "
                f"got {confidence!r}"
            )
        self.k = k
        self.confidence = confidence

    def score(self, logits: Tensor, ctx: GateContext) -> Tensor:
        share = agreement_score(logits, ctx.history, self.k, members=ctx.members)
        if self.confidence is None:
            return share
        return share * _CONFIDENCE[self.confidence](logits)

    def config(self) -> dict:
        return {"name": self.name, "k": self.k, "confidence": self.confidence}

    def __repr__(self) -> str:
        return f"AgreementGate(k={self.k}, confidence={self.confidence!r})"


class PatienceGate(Gate):
    """Exit once the prediction has not changed for ``threshold`` consecutive exits (PABEE).

    The score is the patience counter (:func:`patience_score`), an integer, so a threshold of ``t``
    is PABEE's patience ``t``. Exit 0 always scores 0 (nothing to agree with).

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


_GATES: dict[str, Callable[..., Gate]] = {}


def register_gate(name: str, factory: Callable[..., Gate]) -> None:
    """Make ``gate=name`` available in :func:`earlyexit.wrap`.

    Example:
        >>> register_gate("max_softmax_alias", MaxSoftmaxGate)
    """
    _GATES[name] = factory


def gate_names() -> tuple[str, ...]:
    """Names accepted by ``wrap(gate=...)``."""
    return tuple(sorted(_GATES))


def make_gate(gate: str | Gate | dict) -> Gate:
    """A :class:`Gate` from a name, a saved config dict, or a gate object (returned as is).

    Example:
        >>> make_gate("margin")
        MarginGate()
    """
    if isinstance(gate, Gate):
        return gate
    if isinstance(gate, dict):
        options = dict(gate)
        name = options.pop("name", None)
        if name not in _GATES:
            raise ConfigError(f"unknown gate {name!r}; choose one of {', '.join(gate_names())}")
        return _GATES[name](**options)
    if isinstance(gate, str):
        if gate not in _GATES:
            raise ConfigError(
                f"unknown gate {gate!r}; choose one of {', '.join(gate_names())} or pass a Gate object"
            )
        return _GATES[gate]()
    raise ConfigError(f"gate must be a name or a Gate, got {type(gate).__name__}")


def gate_scores(
    gate: str | Gate | dict, head_logits: Tensor, final_logits: Tensor | None = None
) -> Tensor:
    """Per-exit scores of ``gate`` on a recorded stream, as serving would compute them.

    Args:
        gate: a gate name, config or object.
        head_logits: ``[N, E, K]`` logits of every exit head on ``N`` samples (e.g. stacked from
            ``eem.trace`` records with all gates closed; see :func:`stack_trace_logits`).
        final_logits: optional ``[N, K]`` logits of the full model; when given, the result has a
            last column with the gate's score of the full model's answer (what ``confidence`` says
            for samples that ran to the end).

    Returns:
        ``[N, E]`` (or ``[N, E + 1]``) float32 scores; column ``e`` sees heads ``0 .. e - 1`` as
        history, which is what the wrapper passes when every head is evaluated.

    Example:
        >>> stack = torch.tensor([[[2.0, 0.0], [3.0, 0.0], [0.0, 1.0]]])  # 1 sample, 3 exits
        >>> gate_scores("patience", stack).tolist()
        [[0.0, 1.0, 0.0]]
    """
    gate = make_gate(gate)
    if head_logits.dim() != 3:
        raise ConfigError(f"head_logits must be [N, E, K], got shape {tuple(head_logits.shape)}")
    n, num_exits, _ = head_logits.shape
    columns = [head_logits[:, e] for e in range(num_exits)]
    if final_logits is not None:
        if final_logits.shape != (n, head_logits.shape[2]):
            raise ConfigError(
                f"final_logits must be [{n}, {head_logits.shape[2]}], got {tuple(final_logits.shape)}"
            )
        columns.append(final_logits)
    rows = torch.arange(n, device=head_logits.device)
    out = [
        gate.score(logits, GateContext(e, rows, columns[:e])).float()
        for e, logits in enumerate(columns)
    ]
    return torch.stack(out, dim=1)


def all_gate_scores(
    head_logits: Tensor, gates: Sequence[str | Gate] | None = None
) -> dict[str, Tensor]:
    """``{gate name: [N, E] scores}`` for several gates (default: every registered gate).

    Example:
        >>> scores = all_gate_scores(torch.randn(5, 3, 4))
        >>> sorted(scores)[:3], scores["margin"].shape
        (['agreement', 'entropy', 'gini'], torch.Size([5, 3]))
    """
    chosen = list(gates) if gates is not None else list(gate_names())
    result: dict[str, Tensor] = {}
    for g in chosen:
        gate = make_gate(g)
        key = g if isinstance(g, str) else repr(gate)
        result[key] = gate_scores(gate, head_logits)
    return result


def stack_trace_logits(trace: object, batch: int) -> Tensor:
    """``[N, E, K]`` head logits from an :class:`~earlyexit.model.ExitTrace`, in caller row order.

    The trace must have every head evaluated on every row (serve with all gates closed, or audit
    every sample), else a row would be missing and this raises.

    Example:
        >>> res, trace = eem.trace(x)  # doctest: +SKIP
        >>> stack = stack_trace_logits(trace, x.shape[0])  # doctest: +SKIP
    """
    parts = []
    for e, record in enumerate(trace.exits):  # type: ignore[attr-defined]
        if record is None or record.rows.numel() != batch:
            raise ConfigError(
                f"exit {e} was not evaluated on all {batch} rows; trace with all gates closed "
                "(or audit=torch.ones(B, dtype=torch.bool)) to record a full stack"
            )
        out = torch.empty_like(record.logits)
        out[record.rows] = record.logits
        parts.append(out)
    return torch.stack(parts, dim=1)


for _cls in (MaxSoftmaxGate, MarginGate, EntropyGate, GiniGate, AgreementGate, PatienceGate):
    register_gate(_cls.name, _cls)

__all__ = [
    "AgreementGate",
    "EntropyGate",
    "Gate",
    "GateContext",
    "GiniGate",
    "MarginGate",
    "MaxSoftmaxGate",
    "PatienceGate",
    "agreement_score",
    "all_gate_scores",
    "gate_names",
    "gate_scores",
    "gini_score",
    "make_gate",
    "margin_score",
    "max_softmax_score",
    "neg_entropy_score",
    "patience_score",
    "register_gate",
    "stack_trace_logits",
]
