"""The final supervisor (supervisor 2 of BiSupervised): how far even the full model can be trusted.

It scores the full model's logits with the same score functions as the gates and accepts a
prediction when the score reaches its threshold. A new supervisor accepts everything
(threshold ``-inf``) until a threshold is set or calibrated.

What "right" means. Online there are no labels, so a supervisor cannot know which of the full
model's answers are right. Its threshold is therefore fitted on *audited* evidence, of one of two
kinds, and the false-alarm rate it promises is relative to that evidence:

* labelled samples (``reference`` = class labels): right = the prediction equals the label. This is
  the seed's setting and the only one that measures true correctness;
* an audit against a larger tier (``reference`` = that tier's logits): right = the prediction agrees
  with the larger model. A "false alarm" is then rejecting a prediction the larger model would have
  given too; where both models are wrong together the supervisor is not told.

A false alarm is rejecting a prediction that is right; :meth:`Supervisor.calibrate` picks the
strictest threshold whose false-alarm rate on that evidence stays within ``target_fpr``
(optionally with a confidence bound on unseen traffic of the same distribution).

What happens to rejected predictions is the ``policy``:

* ``"flag"``: the answer is returned with ``accepted=False``;
* ``"raise"``: :class:`UntrustedPredictionError` carrying the whole :class:`ExitResult`;
* ``"fallback"``: ``fallback(x_rows, result_rows) -> logits`` answers those rows instead (their
  ``accepted`` stays False so callers can still tell who answered).

Quality is measured as in the seed, with labels: :func:`auroc` of the score separating right from
wrong predictions, and :func:`accepted_accuracy_curve` (accuracy of the accepted predictions
against the share rejected).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor

# The errors live in .errors; imported here so that the old paths
# (earlyexit.supervisors.UntrustedPredictionError, ...) keep working.
from .errors import ConfigError, FallbackError, UntrustedPredictionError
from .gates.scores import CONFIDENCE_SCORES

POLICIES = ("flag", "raise", "fallback")

#: ``fallback(x_rows, result_rows) -> logits [R, num_classes]`` for the rejected rows.
Fallback = Callable[[Tensor, Any], Tensor]


@dataclass
class SupervisorCalibration:
    """How a supervisor's threshold was chosen.

    Attributes:
        threshold: the chosen threshold.
        evidence: samples used; ``right`` of them were right (see the module docs for "right").
        false_alarm_rate: share of right predictions rejected, on the evidence.
        rejected: share of all evidence rejected.
        accepted_accuracy: share right among accepted evidence.
        auroc: of the score separating right from wrong on the evidence (``nan`` if one class is empty).
    """

    threshold: float
    evidence: int
    right: int
    false_alarm_rate: float
    rejected: float
    accepted_accuracy: float
    auroc: float


class Supervisor:
    """Accepts a full-model prediction when ``score(logits) >= threshold``.

    Args:
        score: ``"max_softmax"``, ``"margin"``, ``"entropy"`` or ``"gini"``.
        threshold: start threshold (``-inf`` accepts everything).
        policy: ``"flag"``, ``"raise"`` or ``"fallback"`` (see the module docs).
        fallback: the callable for policy ``"fallback"``.

    Example:
        >>> import torch
        >>> sup = Supervisor("max_softmax", threshold=0.6)
        >>> sup.accept(torch.tensor([[5.0, 0.0], [0.1, 0.0]])).tolist()
        [True, False]
    """

    def __init__(
        self,
        score: str = "max_softmax",
        threshold: float = -math.inf,
        *,
        policy: str = "flag",
        fallback: Fallback | None = None,
    ) -> None:
        if score not in CONFIDENCE_SCORES:
            raise ConfigError(
                f"unknown supervisor score {score!r}; choose one of "
                f"{', '.join(sorted(CONFIDENCE_SCORES))}"
            )
        if policy not in POLICIES:
            raise ConfigError(f"unknown supervisor policy {policy!r}; choose one of {POLICIES}")
        if policy == "fallback" and not callable(fallback):
            raise ConfigError(
                "policy 'fallback' needs fallback=callable(x_rows, result_rows) -> logits"
            )
        self.name = score
        self.threshold = float(threshold)
        self.policy = policy
        self.fallback = fallback

    def score(self, logits: Tensor) -> Tensor:
        """Per-sample trust score of the full model's logits (higher = more trustworthy)."""
        return CONFIDENCE_SCORES[self.name](logits)

    def accept(self, logits: Tensor) -> Tensor:
        """``[B]`` bool: True where the prediction is trusted."""
        return self.score(logits) >= self.threshold

    def calibrate(
        self,
        logits: Tensor,
        reference: Tensor,
        target_fpr: float,
        confidence: float | None = None,
    ) -> SupervisorCalibration:
        """Set the threshold for a false-alarm rate of at most ``target_fpr`` on audited evidence.

        Args:
            logits: ``[N, K]`` the full model's logits on the evidence.
            reference: ``[N]`` int class labels, or ``[N, K]`` logits of a larger tier (audit);
                see the module docs for what "right" then means.
            target_fpr: largest allowed share of right predictions rejected, in (0, 1).
            confidence: if given, the rate holds on new traffic with this probability (an
                order-statistic bound); otherwise it holds on the evidence itself.

        Example:
            >>> import torch
            >>> logits = torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.2, 0.0], [0.1, 0.0]])
            >>> sup = Supervisor()
            >>> info = sup.calibrate(logits, torch.tensor([0, 0, 0, 1]), target_fpr=0.34)
            >>> info.false_alarm_rate, sup.accept(logits).tolist()
            (0.3333333333333333, [True, True, False, False])
        """
        correct = right_predictions(logits, reference)
        scores = self.score(logits).detach().float().cpu()
        self.threshold = threshold_for_fpr(scores, correct, target_fpr, confidence)
        accepted = scores >= self.threshold
        n_right = int(correct.sum())
        return SupervisorCalibration(
            threshold=self.threshold,
            evidence=int(scores.numel()),
            right=n_right,
            false_alarm_rate=float((correct & ~accepted).sum()) / max(n_right, 1),
            rejected=float((~accepted).float().mean()),
            accepted_accuracy=float(correct[accepted].float().mean())
            if bool(accepted.any())
            else math.nan,
            auroc=auroc(scores, correct),
        )

    def enforce(self, x: Tensor, result: Any) -> Any:
        """Apply the policy to a served batch (``EarlyExitModel.predict`` and ``Cascade`` call it).

        Example:
            >>> res = sup.enforce(x, eem.trace(x)[0])  # doctest: +SKIP
        """
        if self.policy == "flag" or bool(result.accepted.all()):
            return result
        if self.policy == "raise":
            raise UntrustedPredictionError(result)
        rows = torch.nonzero(~result.accepted).flatten()
        subset = type(result)(
            result.logits[rows],
            result.exit_index[rows],
            result.confidence[rows],
            result.accepted[rows],
        )
        assert self.fallback is not None
        replacement = self.fallback(x[rows], subset)
        if not isinstance(replacement, Tensor) or tuple(replacement.shape) != tuple(
            subset.logits.shape
        ):
            raise FallbackError(
                f"the fallback must return logits of shape {tuple(subset.logits.shape)} for the "
                f"{rows.numel()} rejected rows, got {type(replacement).__name__} "
                f"{tuple(getattr(replacement, 'shape', ()))}"
            )
        logits = result.logits.clone()
        logits[rows] = replacement.to(device=logits.device, dtype=logits.dtype)
        return type(result)(logits, result.exit_index, result.confidence, result.accepted)

    def config(self) -> dict:
        """JSON-serialisable description (saved with the heads; a fallback must be passed again)."""
        return {"name": self.name, "threshold": self.threshold, "policy": self.policy}

    def __repr__(self) -> str:
        return f"Supervisor({self.name!r}, threshold={self.threshold}, policy={self.policy!r})"


def make_supervisor(supervisor: str | Supervisor | dict | None) -> Supervisor | None:
    """A :class:`Supervisor` from a score name, a saved config, an object, or ``None`` (no supervisor).

    A saved ``"fallback"`` policy cannot bring its callable back; it is restored as ``"flag"``.

    Example:
        >>> make_supervisor({"name": "margin", "threshold": 0.2})
        Supervisor('margin', threshold=0.2, policy='flag')
    """
    if supervisor is None or isinstance(supervisor, Supervisor):
        return supervisor
    if isinstance(supervisor, str):
        return Supervisor(supervisor)
    if isinstance(supervisor, dict):
        policy = supervisor.get("policy", "flag")
        return Supervisor(
            supervisor.get("name", "max_softmax"),
            supervisor.get("threshold", -math.inf),
            policy="flag" if policy == "fallback" else policy,
        )
    raise ConfigError(
        f"supervisor must be a score name, a Supervisor or None, got {type(supervisor).__name__}"
    )


# ---------------------------------------------------------------------------- plain functions


def right_predictions(logits: Tensor, reference: Tensor) -> Tensor:
    """``[N]`` bool: the prediction equals the label (``reference`` ``[N]`` ints) or the reference
    model's argmax (``reference`` ``[N, K]`` logits).

    Example:
        >>> right_predictions(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])).tolist()
        [False]
    """
    pred = logits.argmax(dim=-1).cpu()
    if reference.dim() == 2 and reference.shape == logits.shape:
        target = reference.argmax(dim=-1).cpu()
    elif reference.dim() == 1 and reference.shape[0] == logits.shape[0]:
        if reference.is_floating_point():
            raise ConfigError("labels must be integers; pass reference logits as [N, K]")
        target = reference.cpu()
    else:
        raise ConfigError(
            f"reference must be [N] labels or [N, K] logits for logits {tuple(logits.shape)}, "
            f"got {tuple(reference.shape)}"
        )
    return pred == target


def threshold_for_fpr(
    scores: Tensor, correct: Tensor, target_fpr: float, confidence: float | None = None
) -> float:
    """The strictest threshold rejecting at most ``target_fpr`` of the right predictions.

    A sample is rejected when its score is strictly below the threshold. Among the ``n`` right
    samples sorted by score, rejecting the ``m`` lowest is allowed when ``m / n <= target_fpr``
    (empirical), or, with ``confidence``, when the ``(m+1)``-th lowest score is a ``confidence``
    upper bound of the ``target_fpr`` quantile of right samples' scores: for exchangeable data
    the false-alarm rate of that threshold is ``Beta(m + 1, n - m)`` distributed, so it needs
    ``BetaCDF(target_fpr; m + 1, n - m) >= confidence``. With too little evidence for ``m = 0``
    it accepts everything (``-inf``).

    Example:
        >>> right = torch.tensor([1, 1, 1, 0]).bool()
        >>> round(threshold_for_fpr(torch.tensor([0.9, 0.8, 0.3, 0.2]), right, 0.34), 4)
        0.8
    """
    if not 0.0 < target_fpr < 1.0:
        raise ConfigError(f"target_fpr must be in (0, 1), got {target_fpr}")
    if confidence is not None and not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    scores = scores.detach().float().cpu().flatten()
    correct = correct.detach().bool().cpu().flatten()
    if scores.shape != correct.shape:
        raise ConfigError("scores and correct must have one entry per sample")
    right = torch.sort(scores[correct]).values
    n = int(right.numel())
    if n == 0:
        raise ConfigError(
            "no right prediction in the evidence: a false-alarm rate cannot be estimated"
        )
    if confidence is None:
        m = math.floor(target_fpr * n + 1e-9)
    else:
        cand = np.arange(n)
        # P(false-alarm rate <= target) of rejecting the cand lowest; decreasing in cand.
        ok = np.nonzero(stats.beta.cdf(target_fpr, cand + 1, n - cand) >= confidence)[0]
        if ok.size == 0:
            return -math.inf
        m = int(ok.max())
    return float(right[m]) if m < n else math.inf


def auroc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for telling ``positive`` from the rest (ties count
    half), i.e. the Mann-Whitney probability that a positive outscores a negative. For a supervisor,
    positive = right prediction. ``nan`` when a class is empty.

    Example:
        >>> auroc(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1, 0, 1, 0]).bool())
        0.75
    """
    scores = scores.detach().double().cpu().flatten()
    positive = positive.detach().bool().cpu().flatten()
    n_pos = int(positive.sum())
    n_neg = int(positive.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = torch.from_numpy(stats.rankdata(scores.numpy()))  # average ranks for ties
    rank_sum = float(ranks[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def accepted_accuracy_curve(
    scores: Tensor, correct: Tensor, max_points: int = 101
) -> dict[str, list[float]]:
    """Accuracy of the accepted predictions against the share rejected, for every threshold.

    Returns ``{"threshold", "rejected", "accepted_accuracy"}`` lists, from rejecting nothing to
    rejecting all but the surest tie group (thinned to about ``max_points``).

    Example:
        >>> c = accepted_accuracy_curve(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([1, 1, 0]).bool())
        >>> c["rejected"], c["accepted_accuracy"]
        ([0.0, 0.3333333333333333, 0.6666666666666666], [0.6666666666666666, 1.0, 1.0])
    """
    scores = scores.detach().float().cpu().flatten()
    correct = correct.detach().bool().cpu().flatten()
    n = int(scores.numel())
    if n == 0:
        return {"threshold": [], "rejected": [], "accepted_accuracy": []}
    order = torch.argsort(scores, descending=True)
    s, c = scores[order], correct[order].double()
    hits = torch.cumsum(c, 0)
    # Cut after position j (accept j + 1 samples) only where the score strictly drops.
    last = torch.ones(n, dtype=torch.bool)
    last[:-1] = s[:-1] > s[1:]
    cuts = torch.nonzero(last).flatten().flip(0)  # from accepting all to accepting fewest
    if cuts.numel() > max_points:
        pick = torch.linspace(0, cuts.numel() - 1, max_points).round().long().unique()
        cuts = cuts[pick]
    thresholds, rejected, accuracy = [], [], []
    for j in cuts.tolist():
        thresholds.append(float(s[j]))
        rejected.append((n - j - 1) / n)
        accuracy.append(float(hits[j]) / (j + 1))
    return {"threshold": thresholds, "rejected": rejected, "accepted_accuracy": accuracy}


__all__ = [
    "POLICIES",
    "FallbackError",
    "Supervisor",
    "SupervisorCalibration",
    "UntrustedPredictionError",
    "accepted_accuracy_curve",
    "auroc",
    "make_supervisor",
    "right_predictions",
    "threshold_for_fpr",
]
