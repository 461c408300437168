"""Choosing gate thresholds with a statistical guarantee on agreement with the full model.

Evidence is a set of samples drawn without regard to their content (warm-up traffic, or a random
audit of live traffic) for which every head's gate score and the full model's answer are known. For
each exit, in order, the threshold is the loosest one for which the hypothesis "agreement with the
full model among the samples that would leave here is below ``target``" is rejected at level
``delta``, by a one-sided exact binomial test (Clopper-Pearson), tested as a fixed sequence from the
strictest threshold to looser ones and stopping at the first failure: Learn-then-Test with
fixed-sequence testing, which controls the error without a multiplicity penalty along the sequence.
With ``per_exit_bonferroni`` the level is split over the exits so the guarantee holds for all exits
at once. Samples that leave at exit ``i`` are removed from the evidence for later exits, which sees
exactly the traffic that reaches it.

A gate with too little evidence to pass even one test stays closed (``inf``).

:func:`calibrate_risk_control` promises less and so needs far less evidence: conformal risk control
(CRC) bounds the *expected* disagreement of a served answer with the full model (over the draw of
the evidence and of the new sample), not its value with high probability. See its docstring.

The maths are plain functions of tensors; nothing here touches a model.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from .errors import ConfigError
from .routing import simulate_exits


def binomial_tail_pvalue(failures: int, n: int, max_failure_rate: float) -> float:
    """P(Binom(n, max_failure_rate) <= failures): small when the true failure rate is below the max.

    Example:
        >>> round(binomial_tail_pvalue(0, 300, 0.01), 4)
        0.049
    """
    if n == 0:
        return 1.0
    return float(stats.binom.cdf(failures, n, max_failure_rate))


def clopper_pearson_lower(successes: int, n: int, confidence: float) -> float:
    """One-sided lower confidence bound of a binomial proportion (exact, Clopper-Pearson).

    Example:
        >>> round(clopper_pearson_lower(300, 300, 0.95), 4)
        0.9901
    """
    if n == 0 or successes == 0:
        return 0.0
    return float(stats.beta.ppf(1.0 - confidence, successes, n - successes + 1))


@functools.lru_cache(maxsize=256)
def min_evidence(target: float, delta: float, failures: int = 0) -> int:
    """Fewest exiting samples that can show ``agreement >= target`` at level ``delta`` with
    ``failures`` disagreements among them (``failures=0``: all must agree).

    Example:
        >>> min_evidence(0.99, 0.05), min_evidence(0.99, 0.05, failures=1)
        (299, 473)
    """
    n = math.ceil(math.log(delta) / math.log(target))
    # The tail probability falls as n grows: test a block of n at once (calibration runs often).
    while True:
        block = np.arange(n, n + 1024)
        ok = np.nonzero(stats.binom.cdf(failures, block, 1.0 - target) <= delta)[0]
        if ok.size:
            return int(block[ok[0]])
        n += 1024


#: The fixed sequence starts at the strictest threshold where this many disagreements could still
#: pass. Starting where a single disagreement among the surest few hundred samples fails the
#: first test (and so ends the sequence) made gates flip shut on one unlucky sample.
TOLERATED_FAILURES = 1


@dataclass
class ExitCalibration:
    """How one exit's threshold was chosen (all counts over evidence reaching this exit)."""

    threshold: float
    reached: int
    exiting: int
    agreement: float  # among the evidence that would exit (nan when none exits)
    lower_bound: float  # one-sided lower bound on that agreement at the stated confidence
    reason: str  # why the gate is open or closed, in words


@dataclass
class CalibrationResult:
    """Thresholds for every exit and the evidence behind each."""

    thresholds: tuple[float, ...]
    exits: list[ExitCalibration] = field(default_factory=list)
    evidence: int = 0


def calibrate_thresholds(
    scores: Tensor,
    agree: Tensor,
    target: float,
    confidence: float = 0.95,
    *,
    method: str = "ltt",
    per_exit_bonferroni: bool = True,
    max_candidates: int = 200,
    enabled: list[bool] | None = None,
) -> CalibrationResult:
    """Per-exit thresholds so that agreement on exiting samples is ``>= target`` with ``confidence``.

    Args:
        scores: ``[N, E]`` gate scores of every exit on ``N`` evidence samples (higher = surer).
        agree: ``[N, E]`` bool, whether exit ``e``'s argmax equals the full model's on sample ``n``.
        target: required agreement among samples that leave, e.g. 0.99.
        confidence: probability that the guarantee holds, e.g. 0.95.
        method: ``"ltt"`` (fixed-sequence testing, the guarantee above) or ``"clopper_pearson"``
            (loosest threshold whose lower bound passes, without the sequence's stopping rule:
            more exits, weaker guarantee).
        per_exit_bonferroni: split ``1 - confidence`` over the exits (a joint guarantee).
        max_candidates: thresholds tested per exit (a grid over the evidence's score quantiles).
        enabled: per exit, False keeps that gate closed whatever the evidence says.

    Example:
        >>> s = torch.rand(2000, 2)
        >>> a = torch.rand(2000, 2) < 0.5 + 0.5 * s  # surer heads agree more
        >>> res = calibrate_thresholds(s, a, target=0.95)
        >>> len(res.thresholds)
        2
    """
    if scores.dim() != 2 or agree.shape != scores.shape:
        raise ConfigError(
            f"scores and agree must both be [N, E]; got {tuple(scores.shape)} and {tuple(agree.shape)}"
        )
    if not 0.0 < target < 1.0:
        raise ConfigError(f"target must be in (0, 1), got {target}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    if method not in ("ltt", "clopper_pearson"):
        raise ConfigError(f"method must be 'ltt' or 'clopper_pearson', got {method!r}")
    n, num_exits = scores.shape
    enabled = [True] * num_exits if enabled is None else list(enabled)
    delta = (1.0 - confidence) / (num_exits if per_exit_bonferroni else 1)
    need = min_evidence(target, delta, TOLERATED_FAILURES)
    scores = scores.detach().float().cpu()
    agree = agree.detach().bool().cpu()
    remaining = torch.ones(n, dtype=torch.bool)
    thresholds: list[float] = []
    details: list[ExitCalibration] = []
    for e in range(num_exits):
        s = scores[remaining, e]
        a = agree[remaining, e]
        detail = (
            _calibrate_one(s, a, target, delta, need, method, max_candidates)
            if enabled[e]
            else None
        )
        if detail is None:
            detail = ExitCalibration(math.inf, int(s.numel()), 0, math.nan, 0.0, "switched off")
        thresholds.append(detail.threshold)
        details.append(detail)
        remaining &= ~(scores[:, e] >= detail.threshold)
    return CalibrationResult(tuple(thresholds), details, n)


def _calibrate_one(
    s: Tensor, a: Tensor, target: float, delta: float, need: int, method: str, max_candidates: int
) -> ExitCalibration:
    reached = int(s.numel())
    if reached < need:
        return ExitCalibration(
            math.inf,
            reached,
            0,
            math.nan,
            0.0,
            f"closed: {reached} evidence samples, {need} needed",
        )
    order = torch.argsort(s, descending=True)
    s_sorted, a_sorted = s[order], a[order]
    fails = torch.cumsum((~a_sorted).long(), 0)
    # Cut after position j only where the score strictly drops, so "score >= s[j]" is exactly the
    # first j + 1 samples; start where enough samples exit to pass at all.
    boundary = torch.ones(reached, dtype=torch.bool)
    boundary[:-1] = s_sorted[:-1] > s_sorted[1:]
    cuts = torch.nonzero(boundary).flatten()
    cuts = cuts[cuts + 1 >= need]
    if cuts.numel() == 0:
        return ExitCalibration(
            math.inf, reached, 0, math.nan, 0.0, "closed: scores too tied to test"
        )
    cuts = _thin(cuts, max_candidates)
    # One vectorised binomial call for every candidate (calibration reruns often while serving).
    counts = cuts + 1
    pvalues = stats.binom.cdf(fails[cuts].numpy(), counts.numpy(), 1.0 - target)
    passed = torch.from_numpy(pvalues <= delta)
    if method == "ltt":
        # Fixed sequence: the first failure ends the sequence.
        failed = torch.nonzero(~passed).flatten()
        last = int(failed[0]) if failed.numel() else int(passed.numel())
        best: int | None = int(cuts[last - 1]) if last > 0 else None
    else:
        hits = torch.nonzero(passed).flatten()
        best = int(cuts[hits[-1]]) if hits.numel() else None
    if best is None:
        j = int(cuts[0])
        agreement = 1.0 - float(fails[j]) / (j + 1)
        return ExitCalibration(
            math.inf,
            reached,
            0,
            math.nan,
            0.0,
            f"closed: agreement {agreement:.4f} of the surest {j + 1} not provably >= {target}",
        )
    count = best + 1
    agreement = 1.0 - float(fails[best]) / count
    lower = clopper_pearson_lower(count - int(fails[best]), count, 1.0 - delta)
    return ExitCalibration(
        float(s_sorted[best]),
        reached,
        count,
        agreement,
        lower,
        f"open: {count}/{reached} exit, agreement {agreement:.4f} >= {lower:.4f} (bound)",
    )


def calibrate_joint(
    scores: Tensor,
    agree: Tensor,
    target: float,
    confidence: float = 0.95,
    *,
    max_candidates: int = 200,
    enabled: list[bool] | None = None,
    suffix_search: bool = True,
) -> CalibrationResult:
    """One threshold shared by every enabled exit, so that agreement among *all* samples that leave
    early (pooled over exits) is ``>= target`` with ``confidence``.

    Learn-then-Test over the one-parameter path "every gate at threshold ``lam``", from the
    strictest ``lam`` down, stopping at the first test that fails. Pooling the evidence of every
    exit into one test (no split of the level over exits) needs far less evidence than per-exit
    calibration: an exit that is right on its surest samples can open before it alone could prove
    it. The guarantee is on the pooled agreement of early answers (samples that run to the end agree
    by definition), not on each exit separately. Scores must be on one scale across exits (true of
    the built-in gates, which depend only on the logits).

    Example:
        >>> s = torch.rand(2000, 2)
        >>> a = torch.rand(2000, 2) < 0.5 + 0.5 * s
        >>> len(calibrate_joint(s, a, target=0.95).thresholds)
        2
    """
    if scores.dim() != 2 or agree.shape != scores.shape:
        raise ConfigError(
            f"scores and agree must both be [N, E]; got {tuple(scores.shape)} and {tuple(agree.shape)}"
        )
    if not 0.0 < target < 1.0 or not 0.0 < confidence < 1.0:
        raise ConfigError(f"target and confidence must be in (0, 1), got {target}, {confidence}")
    n, num_exits = scores.shape
    enabled = [True] * num_exits if enabled is None else list(enabled)
    delta = 1.0 - confidence
    need = min_evidence(target, delta, TOLERATED_FAILURES)
    scores = scores.detach().float().cpu()
    agree = agree.detach().bool().cpu()
    closed = (math.inf,) * num_exits
    on = [e for e in range(num_exits) if enabled[e]]

    def details(thresholds: tuple[float, ...], reason: str) -> list[ExitCalibration]:
        return _exit_details(scores, agree, thresholds, enabled, reason, confidence)

    if not on or n < need:
        reason = f"closed: {n} evidence samples, {need} needed (joint)"
        return CalibrationResult(closed, details(closed, reason), n)
    # The path over every enabled exit gets half the level; if it cannot open, paths that leave out
    # the earliest exits (a weak early head's confident mistakes can sink the pooled test) share the
    # other half. The first path that opens is served: Bonferroni keeps the total error <= delta.
    subsets = [on[k:] for k in range(len(on))] if suffix_search and len(on) > 1 else [on]
    levels = (
        [delta]
        if len(subsets) == 1
        else [delta / 2] + [delta / (2 * (len(subsets) - 1))] * (len(subsets) - 1)
    )
    first_reason = ""
    for subset, level in zip(subsets, levels, strict=True):
        thresholds, reason = _joint_path(scores, agree, subset, target, level, max_candidates)
        if thresholds is not None:
            if subset != on:
                reason += (
                    f"; exits {on[: len(on) - len(subset)]} left out (they sank the pooled test)"
                )
            return CalibrationResult(thresholds, details(thresholds, reason), n)
        first_reason = first_reason or reason
    return CalibrationResult(closed, details(closed, first_reason), n)


def _exit_details(
    scores: Tensor,
    agree: Tensor,
    thresholds: tuple[float, ...],
    enabled: list[bool],
    reason: str,
    confidence: float | None = None,
) -> list[ExitCalibration]:
    """Per exit, what ``thresholds`` do on the evidence: samples reaching it, leaving there, their
    agreement and its Clopper-Pearson lower bound at ``confidence`` (NaN without one)."""
    n, num_exits = scores.shape
    where = simulate_exits(scores, thresholds)
    out, reaching = [], torch.ones(n, dtype=torch.bool)
    for e in range(num_exits):
        leave = where == e
        count = int(leave.sum())
        ok = int((agree[:, e] & leave).sum())
        if confidence is None:
            bound = math.nan
        else:
            bound = clopper_pearson_lower(ok, count, confidence) if count else 0.0
        out.append(
            ExitCalibration(
                thresholds[e],
                int(reaching.sum()),
                count,
                ok / count if count else math.nan,
                bound,
                "switched off" if not enabled[e] else reason,
            )
        )
        reaching &= ~leave
    return out


def _joint_path(
    scores: Tensor, agree: Tensor, on: list[int], target: float, delta: float, max_candidates: int
) -> tuple[tuple[float, ...] | None, str]:
    """Fixed-sequence test along "every exit in ``on`` at threshold lam"; (thresholds, reason)."""
    n, num_exits = scores.shape
    need = min_evidence(target, delta, TOLERATED_FAILURES)
    # Each sample's best score over the exits in use decides whether it leaves at a given lam.
    best = scores[:, on].max(dim=1).values
    ascending = torch.sort(best).values
    candidates = torch.unique(best).flip(0)  # strictest first
    counts = n - torch.searchsorted(ascending, candidates, side="left")  # samples with best >= c
    usable = candidates[counts >= need]
    if usable.numel() == 0:
        return None, f"closed: fewer than {need} evidence samples to test (joint)"
    usable = _thin(usable, max_candidates)
    thresholds_for = [
        tuple(float(lam) if e in on else math.inf for e in range(num_exits)) for lam in usable
    ]
    exited, failed = (t.tolist() for t in _pooled_outcomes(scores[:, on], agree[:, on], usable))
    pvalues = stats.binom.cdf(failed, exited, 1.0 - target)
    chosen: int | None = None
    for k, p in enumerate(pvalues):
        if p > delta:
            break  # fixed sequence: the first failure ends it
        chosen = k
    if chosen is None:
        agreement = 1.0 - failed[0] / exited[0]
        return None, (
            f"closed: pooled agreement {agreement:.4f} of the surest {exited[0]} not provably >= {target}"
        )
    count, fails = exited[chosen], failed[chosen]
    lower = clopper_pearson_lower(count - fails, count, 1.0 - delta)
    reason = (
        f"open (joint): {count}/{n} leave early, pooled agreement {1 - fails / count:.4f} >= "
        f"{lower:.4f} (bound)"
    )
    return thresholds_for[chosen], reason


def risk_control_min_evidence(target: float) -> int:
    """Fewest evidence samples with which :func:`calibrate_risk_control` can open a gate (when none
    of the samples that would leave disagrees): ``n >= 1 / (1 - target) - 1``.

    Example:
        >>> risk_control_min_evidence(0.99), risk_control_min_evidence(0.9)
        (99, 9)
    """
    if not 0.0 < target < 1.0:
        raise ConfigError(f"target must be in (0, 1), got {target}")
    alpha = 1.0 - target
    n = max(0, math.floor(1.0 / alpha - 1.0))
    while not _crc_allows(0, n, alpha):
        n += 1
    while n > 0 and _crc_allows(0, n - 1, alpha):
        n -= 1
    return n


#: Slack on the CRC inequality, so that 1 - 0.9 = 0.09999999999999998 still reads as 0.1.
_CRC_SLACK = 1e-9


def _crc_allows(losses: int | Tensor, n: int, alpha: float) -> bool | Tensor:
    """The CRC condition ``(n / (n + 1)) * mean + 1 / (n + 1) <= alpha`` for a total of ``losses``
    (bounded by 1 each) over ``n`` samples, i.e. ``losses + 1 <= alpha * (n + 1)``."""
    return losses + 1 <= alpha * (n + 1) + _CRC_SLACK


def risk_envelope(scores: Tensor, agree: Tensor, enabled: list[bool] | None = None) -> Tensor:
    """``[N]``: per sample, the largest shared threshold at which it would leave early with a
    wrong answer (``-inf``: at no threshold).

    With several exits the loss ``L_i(lam)`` = "sample ``i`` leaves early at shared threshold
    ``lam`` (first enabled exit whose score ``>= lam``) and that exit disagrees with the full
    model" is not monotone in ``lam``: lowering ``lam`` can move a sample from a wrong later exit
    to a right earlier one. Its monotone upper envelope ``max_{lam' >= lam} L_i(lam')`` is
    ``1[lam <= t_i]`` with the ``t_i`` returned here: exit ``e`` is the first to let the sample
    out exactly for ``lam`` in ``(max of the earlier enabled scores, s_e]``, so ``t_i`` is the
    largest ``s_e`` of a disagreeing exit whose interval is not empty. NaN scores never pass.

    Example:
        >>> s = torch.tensor([[0.25, 0.75], [0.75, 0.5]])
        >>> a = torch.tensor([[True, False], [True, False]])
        >>> risk_envelope(s, a).tolist()  # row 1: exit 0 always passes first, exit 1 never serves
        [0.75, -inf]
    """
    if scores.dim() != 2 or agree.shape != scores.shape:
        raise ConfigError(
            f"scores and agree must both be [N, E]; got {tuple(scores.shape)} and {tuple(agree.shape)}"
        )
    n, num_exits = scores.shape
    enabled = [True] * num_exits if enabled is None else list(enabled)
    if len(enabled) != num_exits:
        raise ConfigError(f"enabled must hold one flag per exit ({num_exits}), got {len(enabled)}")
    s = scores.detach().float().cpu().nan_to_num(nan=-math.inf)
    a = agree.detach().bool().cpu()
    worst = torch.full((n,), -math.inf)
    before = torch.full((n,), -math.inf)  # max score of the earlier enabled exits
    for e in range(num_exits):
        if not enabled[e]:
            continue
        serves = (s[:, e] > before) & ~a[:, e]
        worst = torch.where(serves, torch.maximum(worst, s[:, e]), worst)
        before = torch.maximum(before, s[:, e])
    return worst


def calibrate_risk_control(
    scores: Tensor,
    agree: Tensor,
    target: float,
    *,
    enabled: list[bool] | None = None,
) -> CalibrationResult:
    """One threshold shared by the enabled exits, by conformal risk control (CRC): the expected
    disagreement of a served answer with the full model is at most ``1 - target``.

    The promise, exactly: if the evidence samples and a new sample are exchangeable (e.g. i.i.d.
    draws from the same traffic), then ``E[1(the new sample leaves early and its answer differs
    from the full model's)] <= 1 - target``, the expectation taken over the draw of the evidence
    *and* of the new sample. Samples that run to the end count as agreeing, so this is the
    expected disagreement among *all* served answers; it is weaker than
    :func:`calibrate_joint`'s promise (agreement among early answers ``>= target`` with
    probability ``confidence``): a given calibration may serve more disagreement than
    ``1 - target`` (only the average over calibrations is bounded), and agreement among the
    early answers alone may fall below ``target`` when many samples leave early.

    How: the loss ``L_i(lam)`` (sample ``i`` leaves early at ``lam`` and disagrees) is not
    monotone in ``lam`` with several exits, so its monotone upper envelope ``L~_i(lam) =
    max_{lam' >= lam} L_i(lam')`` is used (:func:`risk_envelope`, bounded by ``B = 1``), and
    ``lam_hat`` is the smallest candidate (a sample's best enabled score; tested exactly, no grid)
    with ``(n / (n + 1)) * mean_i L~_i(lam) + 1 / (n + 1) <= 1 - target``. Since ``L <= L~`` and
    ``L~`` does not increase with ``lam``, the bound holds for the served loss. With no evidence
    sample disagreeing it still needs ``n >= 1 / (1 - target) - 1`` samples
    (:func:`risk_control_min_evidence`: 99 at 0.99, against ~300-470 for Learn-then-Test); below
    that every gate stays closed. There is no ``confidence``: the guarantee is in expectation.
    Every evidence sample weighs the same, so the evidence must be a uniform draw of traffic (not
    only the samples that ran to the end). Scores must be on one scale across exits.

    Args:
        scores: ``[N, E]`` gate scores (higher = surer; NaN never passes).
        agree: ``[N, E]`` bool, whether exit ``e``'s answer equals the full model's on sample ``n``.
        target: ``1 - target`` is the bound on expected disagreement, e.g. 0.99.
        enabled: per exit, False keeps that gate closed (``inf``) and ignores its scores.

    Example:
        >>> s = torch.tensor([[0.75, 0.25]] * 98 + [[0.5, 0.25], [0.25, 0.875]])
        >>> a = torch.ones(100, 2, dtype=torch.bool)
        >>> a[98, 0] = a[99, 1] = False  # two wrong answers, envelope levels 0.5 and 0.875
        >>> calibrate_risk_control(s, a, target=0.98).thresholds  # at 0.5: 2 + 1 > 0.02 * 101
        (0.75, 0.75)
    """
    if scores.dim() != 2 or agree.shape != scores.shape:
        raise ConfigError(
            f"scores and agree must both be [N, E]; got {tuple(scores.shape)} and {tuple(agree.shape)}"
        )
    if agree.dtype != torch.bool:
        raise ConfigError(f"agree must be a bool tensor, got {agree.dtype}")
    if not scores.is_floating_point():
        raise ConfigError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if not (isinstance(target, int | float) and 0.0 < target < 1.0):
        raise ConfigError(f"target must be in (0, 1), got {target!r}")
    n, num_exits = scores.shape
    enabled = [True] * num_exits if enabled is None else list(enabled)
    if len(enabled) != num_exits or not all(isinstance(f, bool) for f in enabled):
        raise ConfigError(
            f"enabled must hold one True/False per exit ({num_exits}), got {enabled!r}"
        )
    alpha = 1.0 - target
    need = risk_control_min_evidence(target)
    s = scores.detach().float().cpu()
    a = agree.detach().bool().cpu()
    closed = (math.inf,) * num_exits
    on = [e for e in range(num_exits) if enabled[e]]

    def result(thresholds: tuple[float, ...], reason: str) -> CalibrationResult:
        # No confidence bound exists for an expectation guarantee: NaN says so.
        return CalibrationResult(thresholds, _exit_details(s, a, thresholds, enabled, reason), n)

    if not on or n < need:
        return result(closed, f"closed: {n} evidence samples, {need} needed (expected)")
    worst = torch.sort(risk_envelope(s, a, enabled)).values  # ascending
    best = s[:, on].nan_to_num(nan=-math.inf).max(dim=1).values
    candidates = torch.unique(best[torch.isfinite(best)])  # ascending: loosest first
    # Envelope losses at each candidate lam: samples with t_i >= lam.
    losses = n - torch.searchsorted(worst, candidates, side="left")
    ok = _crc_allows(losses, n, alpha)
    if candidates.numel() == 0 or not bool(ok.any()):
        return result(
            closed,
            f"closed: {n - int((worst == -math.inf).sum())} of {n} evidence samples leave early "
            f"wrongly at the strictest threshold; CRC allows {alpha * (n + 1) - 1:.2f} (expected)",
        )
    # ok is monotone (losses fall as lam rises): the first True is the loosest allowed lam.
    k = int(torch.nonzero(ok).flatten()[0])
    lam = float(candidates[k])
    thresholds = tuple(lam if enabled[e] else math.inf for e in range(num_exits))
    leaving = int((simulate_exits(s, thresholds) < num_exits).sum())
    bound = (int(losses[k]) + 1) / (n + 1)
    reason = (
        f"open (expected): {leaving}/{n} leave early; CRC bound on expected disagreement "
        f"{bound:.4f} <= {alpha:.4f}"
    )
    return result(thresholds, reason)


def _thin(candidates: Tensor, max_candidates: int) -> Tensor:
    """At most ``max_candidates`` thresholds, evenly spread over ``candidates`` (order kept)."""
    if candidates.numel() <= max_candidates:
        return candidates
    pick = torch.linspace(0, candidates.numel() - 1, max_candidates).round().long().unique()
    return candidates[pick]


def _pooled_outcomes(scores: Tensor, agree: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
    """For every shared threshold in ``candidates`` at once, on ``[N, U]`` scores and agreement of
    the exits in use: ``[C]`` samples leaving early (at the first exit whose score reaches the
    threshold) and ``[C]`` of them disagreeing with the full model."""
    passes = scores[None, :, :] >= candidates[:, None, None]  # [C, N, U]
    leave = passes.any(dim=2)
    first = passes.to(torch.uint8).argmax(dim=2)  # first passing exit (0 where none passes)
    right = agree.gather(1, first.T).T  # [C, N]
    return leave.sum(dim=1), (leave & ~right).sum(dim=1)


def empirical_joint_thresholds(
    scores: Tensor,
    agree: Tensor,
    target: float,
    *,
    enabled: list[bool] | None = None,
    max_candidates: int = 200,
    among: str = "early",
) -> tuple[float, ...]:
    """The most lenient threshold, shared by the enabled exits, at which the pooled agreement of
    the samples leaving early is ``>= target`` on these very samples: a point estimate with no
    confidence bound, for comparing exit sets (what each would save), never for serving. With
    ``among="all"`` the agreement is counted over all samples (those running to the end agree),
    as the expected guarantee counts it.

    Example:
        >>> s = torch.tensor([[0.75, 0.125], [0.5, 0.875], [0.25, 0.375]])
        >>> a = torch.tensor([[True, True], [False, True], [False, True]])
        >>> empirical_joint_thresholds(s, a, 0.9)  # any lower, row 1 leaves at exit 0, wrongly
        (0.75, 0.75)
    """
    if scores.dim() != 2 or agree.shape != scores.shape:
        raise ConfigError(
            f"scores and agree must both be [N, E]; got {tuple(scores.shape)} and {tuple(agree.shape)}"
        )
    if among not in ("early", "all"):
        raise ConfigError(f"among must be 'early' or 'all', got {among!r}")
    n, num_exits = scores.shape
    enabled = [True] * num_exits if enabled is None else list(enabled)
    on = [e for e in range(num_exits) if enabled[e]]
    if not on or n == 0:
        return (math.inf,) * num_exits
    sub = scores.detach().float().cpu()[:, on]
    candidates = _thin(torch.unique(sub.max(dim=1).values), max_candidates)  # ascending
    exited, failed = _pooled_outcomes(sub, agree.detach().bool().cpu()[:, on], candidates)
    ok = (exited > 0) & (failed <= (1.0 - target) * (exited if among == "early" else n))
    if not bool(ok.any()):
        return (math.inf,) * num_exits
    lam = float(candidates[ok].min())
    return tuple(lam if e in on else math.inf for e in range(num_exits))


__all__ = [
    "CalibrationResult",
    "ExitCalibration",
    "binomial_tail_pvalue",
    "calibrate_joint",
    "calibrate_risk_control",
    "calibrate_thresholds",
    "clopper_pearson_lower",
    "empirical_joint_thresholds",
    "min_evidence",
    "risk_control_min_evidence",
    "risk_envelope",
]
