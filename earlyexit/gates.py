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

:class:`LearnedGate` is fitted from data: its score is the predicted log-odds that the exit's head
agrees (same argmax) with the full model, a logistic regression per exit on a few signals
(:func:`agreement_features`: confidence, margin, entropy, and whether the previous head agreed).
The hand-made scores above live on a different scale at every exit (a max-softmax of 0.9 is not
equally trustworthy at exit 0 and exit 3), so each exit needs its own threshold; a calibrated
log-odds of agreement means the same thing everywhere, so one shared threshold can serve every
exit, and several weak signals combine into one score. Fit it with :func:`fit_learned_gate`;
unfitted, it scores like ``max_softmax``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import ClassVar

import torch
from torch import Tensor

from ._threads import fixed_threads
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
    # Not a ClassVar: a gate may decide per instance (e.g. LearnedGate, only when fitted with history).
    needs_history: bool = False

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


AGREEMENT_FEATURES: tuple[str, ...] = (
    "max_prob",
    "margin",
    "norm_neg_entropy",
    "log_odds",
    "prev_agrees",
    "prev_prob_of_pred",
    "mean_max_prob",
)
"""Names of the columns of :func:`agreement_features`, in order (the last three look back)."""

_NUM_FEATURES = len(AGREEMENT_FEATURES)
_NUM_HISTORY_FEATURES = 3
_LOG_ODDS_CLAMP = 30.0


def agreement_features(logits: Tensor, history: Sequence[Tensor | None] = ()) -> Tensor:
    """``[R, 7]`` float32 signals of whether a head agrees with the full model (see
    :data:`AGREEMENT_FEATURES`).

    Columns: the largest softmax probability ``p1``; ``p1 - p2`` (``p1`` with one class); ``1 +
    sum p log p / log K`` in [0, 1] (1 for a one-hot prediction, 1 when ``K == 1``); ``log p1 -
    log(1 - p1)`` computed stably and clamped to [-30, 30]; whether the last entry of ``history``
    has the same argmax (0 when it is ``None`` or there is no history); the last entry's softmax
    probability of the current argmax (0 likewise); the largest probability of the mean of the
    softmaxes of every non-``None`` history entry and the current logits (``p1`` without history).

    Example:
        >>> cur, prev = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
        >>> [round(v, 3) for v in agreement_features(cur, [prev])[0].tolist()]
        [0.881, 0.762, 0.473, 2.0, 1.0, 0.5, 0.69]
    """
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ConfigError(
            f"agreement_features needs logits [R, K] with K >= 1, got shape {tuple(logits.shape)}"
        )
    num_classes = logits.shape[-1]
    # Serving calls this at every open exit, so it is written in few ops (each costs microseconds
    # of dispatch next to a small head): one softmax and one log-softmax, one top-2.
    x = logits.float()
    log_probs = x.log_softmax(dim=-1)
    probs = x.softmax(dim=-1)  # not log_probs.exp(): p1 is max_softmax_score exactly
    pred = x.argmax(dim=-1, keepdim=True)
    if num_classes < 2:
        p1 = probs[..., 0]
        margin = p1
        norm_neg_entropy = torch.ones_like(p1)
    else:
        top2 = probs.topk(2, dim=-1).values
        p1 = top2[..., 0]
        margin = p1 - top2[..., 1]
        plogp = probs * log_probs.clamp_min(-1e30)  # 0 * log 0 -> 0, not nan
        norm_neg_entropy = (1.0 + plogp.sum(dim=-1) / math.log(num_classes)).clamp(0.0, 1.0)
    log_p1 = log_probs.gather(-1, pred).squeeze(-1)
    log_rest = log_probs.scatter(-1, pred, float("-inf")).logsumexp(dim=-1)
    log_odds = (log_p1 - log_rest).clamp(-_LOG_ODDS_CLAMP, _LOG_ODDS_CLAMP)

    zeros = torch.zeros_like(p1)
    prev_agrees, prev_prob, mean_max_prob = zeros, zeros, p1
    past_list = list(history)
    present = [(i, past) for i, past in enumerate(past_list) if past is not None]
    if present:
        prob_sum = probs
        for i, past in present:
            if past.shape != logits.shape:
                raise ConfigError(
                    f"history entry {i} has shape {tuple(past.shape)}, expected the shape of the "
                    f"current logits {tuple(logits.shape)}"
                )
            past_probs = past.float().softmax(dim=-1)
            prob_sum = prob_sum + past_probs
            if i == len(past_list) - 1:
                prev_agrees = (past.argmax(dim=-1, keepdim=True) == pred).squeeze(-1).float()
                prev_prob = past_probs.gather(-1, pred).squeeze(-1)
        mean_max_prob = (prob_sum / (len(present) + 1)).amax(dim=-1)
    return torch.stack(
        [p1, margin, norm_neg_entropy, log_odds, prev_agrees, prev_prob, mean_max_prob], dim=-1
    )


def _as_rows(value: object, what: str) -> list:
    """A list from a sequence, tensor or array (``tolist``), else a ConfigError."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # type: ignore[union-attr]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{what} must be a sequence, got {type(value).__name__}")
    return list(value)


def _as_float(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ConfigError(f"{what} must be finite, got {out!r}")
    return out


class LearnedGate(Gate):
    """Exit when the predicted log-odds that this head agrees with the full model reach the
    threshold (a logistic regression per exit on :func:`agreement_features`).

    Fit it with :func:`fit_learned_gate`. ``weights`` holds one row of 7 floats per exit (in the
    order of :data:`AGREEMENT_FEATURES`), ``bias`` one float per exit; both ``None`` gives an
    unfitted gate, which scores like ``max_softmax``. The final classifier (``exit_index`` equal to
    the number of fitted exits) and any exit beyond those fitted are scored by ``max_softmax`` too.
    ``needs_history`` is true only for a fitted gate with ``use_history``; without it the three
    look-back features are not used (their weights are ignored; :func:`fit_learned_gate` sets them
    to 0).

    Example:
        >>> gate = LearnedGate([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]], [0.5], use_history=False)
        >>> gate.score(torch.tensor([[2.0, 0.0]]), GateContext(0, torch.arange(1))).tolist()
        [2.5]
        >>> make_gate(gate.config())
        LearnedGate(fitted, exits=1, use_history=False)
    """

    name = "learned"

    def __init__(
        self,
        weights: Sequence[Sequence[float]] | None = None,
        bias: Sequence[float] | None = None,
        use_history: bool = True,
    ) -> None:
        if not isinstance(use_history, bool):
            raise ConfigError(f"learned gate use_history must be a bool, got {use_history!r}")
        if (weights is None) != (bias is None):
            raise ConfigError(
                "learned gate needs both weights and bias (a fitted gate) or neither (unfitted); "
                "fit one with fit_learned_gate"
            )
        self.use_history = use_history
        self._weights: Tensor | None = None
        self._bias: Tensor | None = None
        self._on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}
        if weights is not None and bias is not None:
            rows = _as_rows(weights, "learned gate weights")
            biases = _as_rows(bias, "learned gate bias")
            if not rows:
                raise ConfigError("learned gate weights must have one row per exit, got none")
            if len(rows) != len(biases):
                raise ConfigError(
                    f"learned gate has {len(rows)} weight rows but {len(biases)} biases; "
                    "give one row of weights and one bias per exit"
                )
            table = []
            for e, row in enumerate(rows):
                row = _as_rows(row, f"learned gate weights[{e}]")
                if len(row) != _NUM_FEATURES:
                    raise ConfigError(
                        f"learned gate weights[{e}] has {len(row)} values, expected "
                        f"{_NUM_FEATURES} (one per feature: {', '.join(AGREEMENT_FEATURES)})"
                    )
                table.append(
                    [_as_float(v, f"learned gate weights[{e}][{j}]") for j, v in enumerate(row)]
                )
            offsets = [_as_float(v, f"learned gate bias[{e}]") for e, v in enumerate(biases)]
            w = torch.tensor(table, dtype=torch.float32)
            b = torch.tensor(offsets, dtype=torch.float32)
            if not (bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all())):
                raise ConfigError(
                    "learned gate weights and bias must fit in float32 (|v| < 3.4e38)"
                )
            self._weights, self._bias = w, b
            self._on_device[w.device] = (w, b)
        self.needs_history = self.fitted and use_history

    @property
    def fitted(self) -> bool:
        """Whether weights were given (else the gate scores like ``max_softmax``)."""
        return self._weights is not None

    @property
    def num_exits(self) -> int:
        """How many exits have fitted weights (0 when unfitted)."""
        return 0 if self._weights is None else int(self._weights.shape[0])

    @property
    def weights(self) -> Tensor | None:
        """``[E, 7]`` float32 weights on raw features (``None`` when unfitted)."""
        return None if self._weights is None else self._weights.clone()

    @property
    def bias(self) -> Tensor | None:
        """``[E]`` float32 biases (``None`` when unfitted)."""
        return None if self._bias is None else self._bias.clone()

    def _params(self, device: torch.device) -> tuple[Tensor, Tensor]:
        cached = self._on_device.get(device)
        if cached is None:
            assert self._weights is not None and self._bias is not None
            cached = (self._weights.to(device), self._bias.to(device))
            self._on_device[device] = cached
        return cached

    def score(self, logits: Tensor, ctx: GateContext) -> Tensor:
        e = ctx.exit_index
        if e < 0:
            raise ConfigError(f"exit_index must be >= 0, got {e}")
        if self._weights is None or e >= self.num_exits:
            return max_softmax_score(logits)
        weights, bias = self._params(logits.device)
        if self.use_history:
            return agreement_features(logits, ctx.history) @ weights[e] + bias[e]
        # Without history the look-back columns get no weight, whatever the stored weights say.
        current = _NUM_FEATURES - _NUM_HISTORY_FEATURES
        return agreement_features(logits)[..., :current] @ weights[e, :current] + bias[e]

    def config(self) -> dict:
        if self._weights is None or self._bias is None:
            return {
                "name": self.name,
                "weights": None,
                "bias": None,
                "use_history": self.use_history,
            }
        return {
            "name": self.name,
            "weights": [[float(v) for v in row] for row in self._weights.tolist()],
            "bias": [float(v) for v in self._bias.tolist()],
            "use_history": self.use_history,
        }

    def __repr__(self) -> str:
        if not self.fitted:
            return f"LearnedGate(unfitted, use_history={self.use_history})"
        return f"LearnedGate(fitted, exits={self.num_exits}, use_history={self.use_history})"


def _fit_logistic(x: Tensor, y: Tensor, l2: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """L2-regularised logistic regression on standardised float64 ``x [N, D]``, ``y [N]``.

    Minimises ``mean(BCE) + l2 / 2 * (|w|^2 + b^2)`` by Newton's method (a handful of ``D + 1``
    square solves: no autograd, no optimizer, so a calibration pays milliseconds); penalising the
    bias too keeps an exit whose labels are all one class bounded (the objective is strictly
    convex, so the minimum is unique). Steps are halved whenever the objective would rise.
    """
    n, d = x.shape
    design = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    rate = float(y.mean())
    theta = torch.zeros(d + 1, dtype=torch.float64)
    theta[-1] = math.log(max(rate, 1e-3) / max(1.0 - rate, 1e-3))
    eye = torch.eye(d + 1, dtype=torch.float64)

    def objective(t: Tensor) -> float:
        z = design @ t
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y)
        return float(loss) + 0.5 * l2 * float(t.square().sum())

    current = objective(theta)
    for _ in range(max_iter):
        p = torch.sigmoid(design @ theta)
        grad = design.T @ (p - y) / n + l2 * theta
        hessian = (design * (p * (1.0 - p))[:, None]).T @ design / n + l2 * eye
        step = torch.linalg.solve(hessian, grad)
        scale = 1.0
        while True:
            candidate = theta - scale * step
            value = objective(candidate)
            if value <= current or scale < 1e-6:
                break
            scale *= 0.5
        theta, improvement, current = candidate, current - value, value
        if improvement < 1e-12 or float(step.abs().max()) * scale < 1e-10:
            break
    return theta[:-1], theta[-1]


def fit_learned_gate(
    features: Tensor,
    agree: Tensor,
    *,
    use_history: bool = True,
    l2: float = 1e-3,
    min_samples: int = 64,
) -> LearnedGate:
    """Fit a :class:`LearnedGate`: one logistic regression per exit, predicting agreement.

    Each exit's features are standardised (a constant feature gets weight 0), the regression is
    fitted with L-BFGS in float64 (deterministic), and the standardisation is folded back so the
    stored weights apply to raw :func:`agreement_features`. Without ``use_history`` the three
    look-back features get weight 0.

    Args:
        features: ``[N, E, 7]`` :func:`agreement_features` of each exit's head on ``N`` samples
            (exit ``e`` with heads ``0 .. e - 1`` as history, as :func:`gate_scores` passes them).
        agree: ``[N, E]`` bool, whether exit ``e``'s argmax equals the full model's.
        use_history: fit (and later score) with the look-back features.
        l2: strength of the L2 penalty on the mean log-loss (on standardised features); > 0.
        min_samples: refuse to fit on fewer samples than this.

    Example:
        >>> heads = torch.randn(256, 2, 5)
        >>> final = heads[:, 1] + 0.5 * torch.randn(256, 5)
        >>> feats = torch.stack(
        ...     [agreement_features(heads[:, e], [heads[:, i] for i in range(e)]) for e in range(2)], 1
        ... )
        >>> agree = heads.argmax(-1) == final.argmax(-1, keepdim=True)
        >>> fit_learned_gate(feats, agree)
        LearnedGate(fitted, exits=2, use_history=True)
    """
    if not isinstance(use_history, bool):
        raise ConfigError(f"use_history must be a bool, got {use_history!r}")
    if isinstance(l2, bool) or not isinstance(l2, Real) or not (math.isfinite(l2) and l2 > 0):
        raise ConfigError(f"l2 must be a finite number > 0, got {l2!r}")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
        raise ConfigError(f"min_samples must be an int >= 1, got {min_samples!r}")
    if not isinstance(features, Tensor) or not isinstance(agree, Tensor):
        raise ConfigError("features and agree must be tensors ([N, E, 7] and [N, E])")
    if features.dim() != 3 or features.shape[2] != _NUM_FEATURES:
        raise ConfigError(
            f"features must be [N, E, {_NUM_FEATURES}] (agreement_features of each exit, stacked "
            f"on dim 1), got shape {tuple(features.shape)}"
        )
    n, num_exits, _ = features.shape
    if tuple(agree.shape) != (n, num_exits):
        raise ConfigError(
            f"agree must be [N, E] = [{n}, {num_exits}] (does each exit's argmax match the full "
            f"model's), got shape {tuple(agree.shape)}"
        )
    if num_exits < 1:
        raise ConfigError("features has no exits (E = 0); nothing to fit")
    if n < min_samples:
        raise ConfigError(
            f"fit_learned_gate got {n} samples, needs at least min_samples={min_samples}; record "
            "more samples (or lower min_samples, at the risk of an unreliable fit)"
        )
    d = _NUM_FEATURES if use_history else _NUM_FEATURES - _NUM_HISTORY_FEATURES
    # One thread: the problem is tiny, and on a busy CPU the intra-op pool's hand-offs made the
    # fit ~50x slower (3.6 s instead of 0.07 s for N=8192, E=4 on 2 contended cores).
    with fixed_threads(1):
        weights, bias = _fit_all(features, agree, d, float(l2))
    if not (bool(torch.isfinite(weights).all()) and bool(torch.isfinite(bias).all())):
        raise ConfigError("logistic regression diverged (non-finite weights); try a larger l2")
    return LearnedGate(weights.float().tolist(), bias.float().tolist(), use_history=use_history)


def _fit_all(features: Tensor, agree: Tensor, d: int, l2: float) -> tuple[Tensor, Tensor]:
    """``[E, 7]`` raw-feature weights (float64, zero past column ``d``) and ``[E]`` biases."""
    num_exits = features.shape[1]
    with torch.no_grad():
        # Clone out of any inference-mode tensor, onto the CPU: the problem is tiny.
        x_all = features.detach().to("cpu", torch.float64).clone()
        y_all = agree.detach().to("cpu").clone()
        if y_all.dtype != torch.bool:
            if not bool(((y_all == 0) | (y_all == 1)).all()):
                raise ConfigError("agree must be bool (or 0/1), got other values")
            y_all = y_all != 0
        y_all = y_all.to(torch.float64)
        if not bool(torch.isfinite(x_all).all()):
            raise ConfigError("features contain NaN or Inf; compute them with agreement_features")
        weights = torch.zeros(num_exits, _NUM_FEATURES, dtype=torch.float64)
        bias = torch.zeros(num_exits, dtype=torch.float64)
        for e in range(num_exits):
            x = x_all[:, e, :d]
            mean = x.mean(dim=0)
            std = x.std(dim=0, unbiased=False)
            keep = std > 1e-8 * mean.abs().clamp_min(1.0)
            z = (x[:, keep] - mean[keep]) / std[keep]
            w, b = _fit_logistic(z, y_all[:, e], l2, max_iter=50)
            raw = w / std[keep]
            weights[e, :d][keep] = raw
            bias[e] = b - (raw * mean[keep]).sum()
    return weights, bias


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


for _cls in (
    MaxSoftmaxGate,
    MarginGate,
    EntropyGate,
    GiniGate,
    AgreementGate,
    PatienceGate,
    LearnedGate,
):
    register_gate(_cls.name, _cls)

__all__ = [
    "AGREEMENT_FEATURES",
    "AgreementGate",
    "EntropyGate",
    "Gate",
    "GateContext",
    "GiniGate",
    "LearnedGate",
    "MarginGate",
    "MaxSoftmaxGate",
    "PatienceGate",
    "agreement_features",
    "agreement_score",
    "all_gate_scores",
    "fit_learned_gate",
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
