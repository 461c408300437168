"""The learned gate: a logistic regression per exit on whether the head agrees with the full model.

:class:`LearnedGate`'s score is the predicted log-odds that the exit's head agrees (same argmax)
with the full model, fitted on a few signals (:func:`agreement_features`: confidence, margin,
entropy, and whether the previous head agreed). The hand-made scores live on a different scale at
every exit (a max-softmax of 0.9 is not equally trustworthy at exit 0 and exit 3), so each exit
needs its own threshold; a calibrated log-odds of agreement means the same thing everywhere, so one
shared threshold can serve every exit, and several weak signals combine into one score. Fit it with
:func:`fit_learned_gate`; unfitted, it scores like ``max_softmax``.

The features, the gate that scores with them and the fit that makes its weights are one cohesive
thing (the weights only mean something for these features), so they share this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

from .._threads import fixed_threads
from ..errors import ConfigError
from .base import Gate, GateContext
from .scores import max_softmax_score

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
    # The largest log-probability is the one at the argmax (log_softmax is monotone): one op.
    log_p1 = log_probs.amax(dim=-1)
    log_rest = log_probs.scatter(-1, pred, float("-inf")).logsumexp(dim=-1)
    log_odds = (log_p1 - log_rest).clamp(-_LOG_ODDS_CLAMP, _LOG_ODDS_CLAMP)

    prev_agrees: Tensor | None = None
    prev_prob: Tensor | None = None
    mean_max_prob = p1
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
    if prev_agrees is None or prev_prob is None:  # no previous head: zeros (made only then)
        prev_agrees = prev_prob = torch.zeros_like(p1)
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

    ``history_exits`` (one bool per exit, or ``None`` for all) says whose heads the look-back
    reads: the previous head is the last *read* one, and serving never runs a head that no open
    gate reads and whose own gate is closed (:meth:`history_sources`). The calibrator sets it to
    the exits left on after exit selection (:meth:`reading`), so a switched-off exit's head costs
    nothing; the weights stay those fitted with every head as history, and the thresholds are
    calibrated on the scores exactly as served (history restricted), so fit, calibration and
    serving agree on what is scored.

    Example:
        >>> gate = LearnedGate([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]], [0.5], use_history=False)
        >>> gate.score(torch.tensor([[2.0, 0.0]]), GateContext(0, torch.arange(1))).tolist()
        [2.5]
        >>> from earlyexit.gates import make_gate
        >>> make_gate(gate.config())
        LearnedGate(fitted, exits=1, use_history=False)
    """

    name = "learned"
    # Its features include the max softmax, NaN for a non-finite row, and a NaN feature makes
    # the weighted sum NaN (whatever the weight: NaN * 0 is NaN).
    propagates_non_finite = True

    def __init__(
        self,
        weights: Sequence[Sequence[float]] | None = None,
        bias: Sequence[float] | None = None,
        use_history: bool = True,
        history_exits: Sequence[bool] | None = None,
    ) -> None:
        if not isinstance(use_history, bool):
            raise ConfigError(f"learned gate use_history must be a bool, got {use_history!r}")
        if history_exits is not None:
            flags = _as_rows(history_exits, "learned gate history_exits")
            if not all(isinstance(v, bool) for v in flags):
                raise ConfigError(
                    f"learned gate history_exits must be one bool per exit, got {flags!r}"
                )
            history_exits = tuple(flags)
        self.history_exits: tuple[bool, ...] | None = history_exits
        if (weights is None) != (bias is None):
            raise ConfigError(
                "learned gate needs both weights and bias (a fitted gate) or neither (unfitted); "
                "fit one with fit_learned_gate"
            )
        self.use_history = use_history
        self._weights: Tensor | None = None
        self._bias: Tensor | None = None
        self._on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._rows: dict[tuple[torch.device, int], tuple[Tensor, Tensor]] = {}
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

    def history_sources(self, num_exits: int) -> tuple[bool, ...]:
        """Per exit, whether the look-back reads its head (none unless :attr:`needs_history`;
        exits beyond ``history_exits`` are read).

        Example:
            >>> w = [[0.0] * 7] * 3
            >>> LearnedGate(w, [0.0] * 3, history_exits=[True, False, True]).history_sources(3)
            (True, False, True)
        """
        if not self.needs_history:
            return (False,) * num_exits
        chosen = self.history_exits or ()
        return tuple(chosen[i] if i < len(chosen) else True for i in range(num_exits))

    def reading(self, history_exits: Sequence[bool] | None) -> LearnedGate:
        """The same gate (same weights) whose look-back reads only the heads of
        ``history_exits`` (``None``: every head). A new gate: a served one is never changed.

        Example:
            >>> gate = LearnedGate([[0.0] * 7] * 2, [0.0, 0.0])
            >>> gate.reading([False, True]).history_exits
            (False, True)
        """
        return LearnedGate(
            None if self._weights is None else self._weights.tolist(),
            None if self._bias is None else self._bias.tolist(),
            use_history=self.use_history,
            history_exits=history_exits,
        )

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
        if self.use_history:
            # This exit's weight row and bias, sliced once per device (two ops fewer a call).
            rows = self._rows.get((logits.device, e))
            if rows is None:
                weights, bias = self._params(logits.device)
                rows = self._rows[(logits.device, e)] = (weights[e], bias[e])
            history = ctx.history
            chosen = self.history_exits
            if chosen is not None:
                # Only the heads read, in exit order: the previous one is the last read head
                # (serving runs no other; in a trace the others ran but are not looked at).
                history = [h for j, h in enumerate(history) if j >= len(chosen) or chosen[j]]
            return agreement_features(logits, history) @ rows[0] + rows[1]
        # Without history the look-back columns get no weight, whatever the stored weights say.
        weights, bias = self._params(logits.device)
        current = _NUM_FEATURES - _NUM_HISTORY_FEATURES
        return agreement_features(logits)[..., :current] @ weights[e, :current] + bias[e]

    def config(self) -> dict:
        if self._weights is None or self._bias is None:
            config = {
                "name": self.name,
                "weights": None,
                "bias": None,
                "use_history": self.use_history,
            }
        else:
            config = {
                "name": self.name,
                "weights": [[float(v) for v in row] for row in self._weights.tolist()],
                "bias": [float(v) for v in self._bias.tolist()],
                "use_history": self.use_history,
            }
        if self.history_exits is not None:  # absent in configs saved before it existed
            config["history_exits"] = list(self.history_exits)
        return config

    def __repr__(self) -> str:
        if not self.fitted:
            return f"LearnedGate(unfitted, use_history={self.use_history})"
        reads = "" if self.history_exits is None else f", history_exits={list(self.history_exits)}"
        return f"LearnedGate(fitted, exits={self.num_exits}, use_history={self.use_history}{reads})"


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
    fitted by Newton's method in float64 on one thread (deterministic: at most 50 steps, a step
    halved while it would raise the objective, stopping once the objective no longer improves),
    and the standardisation is folded back so the stored weights apply to raw
    :func:`agreement_features`. Without ``use_history`` the three look-back features get weight 0.

    Args:
        features: ``[N, E, 7]`` :func:`agreement_features` of each exit's head on ``N`` samples
            (exit ``e`` with heads ``0 .. e - 1`` as history, as
            :func:`~earlyexit.gates.gate_scores` passes them).
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


__all__ = [
    "AGREEMENT_FEATURES",
    "LearnedGate",
    "agreement_features",
    "fit_learned_gate",
]
