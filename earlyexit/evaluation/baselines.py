"""Baselines on the same backbone and stream, and offline helpers to get trained heads.

* :func:`train_heads` fits copies of a wrapper's heads offline on recorded features, either with
  labels and cross-entropy (SDN-style: frozen backbone, heads trained on a labelled train split)
  or by self-distillation from the full model's logits (label-free; a stand-in for the online
  ``OnlineDistiller`` when only a finite recorded stream is at hand).
* :func:`calibrate_greedy` picks per-exit thresholds on a recorded stream so that every exit's
  answers agree with the full model at least ``target`` of the time (a simple offline stand-in for
  the library's calibration, used to give the SDN baseline a fair operating point).
* :func:`compare_methods` puts the curves and points side by side: the wrapper's heads under a
  threshold sweep and its operating point, SDN heads, fixed max-softmax 0.5, PABEE patience,
  the oracle and the full model.

Example:
    >>> train = record_stream(eem, x_train, labels=y_train, keep_features=True)  # doctest: +SKIP
    >>> sdn_heads = train_heads(eem.heads, train.features, train.labels)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distill import distillation_loss
from ..distill.offline import fit_head
from .policies import PolicyPoint, evaluate_policy, sweep_patience, sweep_thresholds
from .stream import StreamRecord

__all__ = [
    "METHOD_FIXED",
    "METHOD_FULL",
    "METHOD_OPERATING",
    "METHOD_ORACLE",
    "METHOD_PATIENCE",
    "METHOD_SDN",
    "METHOD_SDN_OPERATING",
    "METHOD_SWEEP",
    "best_at_agreement",
    "calibrate_greedy",
    "compare_methods",
    "train_heads",
]

# Method names used in reports, tables and plots.
METHOD_SWEEP = "online heads, threshold sweep"
METHOD_OPERATING = "online heads, operating point"
METHOD_PATIENCE = "online heads, patience (PABEE)"
METHOD_FIXED = "online heads, max-softmax 0.5"
METHOD_SDN = "SDN heads (labels, offline), threshold sweep"
METHOD_SDN_OPERATING = "SDN heads, calibrated point"
METHOD_ORACLE = "oracle"
METHOD_FULL = "full model"


def train_heads(
    heads: Sequence[nn.Module],
    features: Sequence[Tensor],
    targets: Tensor,
    *,
    objective: str = "labels",
    epochs: int = 30,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> list[nn.Module]:
    """Train copies of ``heads`` offline on recorded head inputs; the originals are not touched.

    Args:
        heads: the wrapper's heads (``eem.heads``); each is deep-copied and re-initialised, then its ``classify``
            part is trained on ``features[i]`` (what ``record_stream(keep_features=True)`` keeps).
        features: per exit ``[N, ...]`` reduced features.
        targets: ``[N]`` int labels for ``objective="labels"`` (cross-entropy), or ``[N, K]`` teacher
            logits for ``objective="distill"`` (KL divergence to the teacher's softmax at
            ``temperature``).
        epochs, lr, weight_decay, batch_size: AdamW on shuffled mini-batches.

    Returns:
        The trained copies, in eval mode, on CPU.

    Example:
        >>> sdn = train_heads(eem.heads, rec.features, rec.labels, epochs=5)  # doctest: +SKIP
        >>> distilled = train_heads(eem.heads, rec.features, rec.final_logits, objective="distill")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if objective not in ("labels", "distill"):
        raise ValueError(f"objective must be 'labels' or 'distill', got {objective!r}")
    if len(heads) != len(features):
        raise ValueError(f"{len(heads)} heads but {len(features)} feature sets")
    n = targets.shape[0]
    if objective == "labels" and targets.dim() != 1:
        raise ValueError("objective='labels' needs [N] integer labels")
    if objective == "distill" and targets.dim() != 2:
        raise ValueError("objective='distill' needs [N, K] teacher logits")
    generator = torch.Generator().manual_seed(seed)
    if objective == "labels":

        def loss(logits: Tensor, target: Tensor) -> Tensor:
            return F.cross_entropy(logits, target.long())

    else:

        def loss(logits: Tensor, target: Tensor) -> Tensor:
            return distillation_loss(logits, target, temperature)

    trained = []
    for i, (head, z) in enumerate(zip(heads, features, strict=True)):
        if z.shape[0] != n:
            raise ValueError(f"exit {i}: {z.shape[0]} features for {n} targets")
        student = copy.deepcopy(head).cpu().float().train()
        # A fresh start: the copy must not inherit what the wrapper's heads already learned
        # (a baseline trained from the online heads' weights would not be a baseline).
        for module in student.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        fit_head(
            student,
            z,
            targets,
            loss,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            generator=generator,
            cosine_schedule=True,
            progress=lambda epochs_range, i=i: tqdm(
                epochs_range, desc=f"head {i}", disable=not progress, file=sys.stderr
            ),
        )
        trained.append(student.eval())
    return trained


def calibrate_greedy(
    record: StreamRecord, target: float = 0.99, *, min_samples: int = 20, score: str = "gate"
) -> list[float]:
    """Per-exit thresholds so that each exit's answers agree with the full model >= ``target``.

    Exits are set in order on the samples still running: exit ``i`` gets the lowest threshold at
    which the samples it would let out agree with the full model at least ``target`` of the time
    (and at least ``min_samples`` of them leave); ``inf`` if there is none. On the calibration
    stream the overall agreement is then at least ``target`` too. No statistical guarantee (the
    library's calibration adds one); this is for giving baselines a comparable operating point.

    Example:
        >>> calibrate_greedy(rec, 0.99)  # doctest: +SKIP
        [0.97, 0.93, inf, 0.9]
    """
    values = record.scores if score == "gate" else record.max_prob
    running = torch.ones(record.num_samples, dtype=torch.bool)
    thresholds: list[float] = []
    for i in range(record.num_exits):
        s = values[running, i].double()
        agree = (record.preds[running, i] == record.final_pred[running]).double()
        threshold = math.inf
        if s.numel():
            order = torch.argsort(s, descending=True)
            s, agree = s[order], agree[order]
            rate = agree.cumsum(0) / torch.arange(1, s.numel() + 1, dtype=torch.float64)
            # Only cut between distinct scores: ties leave together.
            boundary = torch.ones_like(s, dtype=torch.bool)
            boundary[:-1] = s[:-1] > s[1:]
            ok = (rate >= target) & boundary & (torch.arange(1, s.numel() + 1) >= min_samples)
            ok &= torch.isfinite(s)
            if bool(ok.any()):
                k = int(torch.nonzero(ok).max())
                threshold = float(s[k])
        thresholds.append(threshold)
        if threshold != math.inf:
            running &= ~(values[:, i] >= threshold)
    return thresholds


def best_at_agreement(points: Sequence[PolicyPoint], target: float) -> PolicyPoint | None:
    """The point with the largest MAC saving whose agreement is at least ``target`` (or ``None``).

    Example:
        >>> best_at_agreement(sweep_thresholds(rec), 0.99).mac_saving  # doctest: +SKIP
    """
    ok = [p for p in points if p.agreement >= target]
    return max(ok, key=lambda p: p.mac_saving) if ok else None


def compare_methods(
    record: StreamRecord,
    operating_thresholds: Sequence[float] | None = None,
    *,
    sdn_record: StreamRecord | None = None,
    sdn_thresholds: Sequence[float] | None = None,
    grid: Sequence[float] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every method's curve and points on one recorded stream, side by side.

    Args:
        record: the stream as served by the wrapper's own (label-free, online) heads.
        operating_thresholds: the thresholds the wrapper serves with (its calibration's choice);
            ``None``: no operating point.
        sdn_record: the same stream scored by heads trained offline with labels
            (``record.with_heads(train_heads(...), gate)``), if available.
        sdn_thresholds: a calibrated operating point for the SDN heads (e.g. from
            :func:`calibrate_greedy` on a calibration split), if any.
        grid: shared thresholds for the sweeps (default: quantiles of each record's scores).

    Returns:
        ``{"curves": {method: [PolicyPoint, ...]}, "points": {method: PolicyPoint}}`` with the
        method names of this module (``METHOD_*``).

    Example:
        >>> out = compare_methods(rec, eem.thresholds)  # doctest: +SKIP
        >>> out["points"]["oracle"].mac_saving  # doctest: +SKIP
    """
    curves: dict[str, list[PolicyPoint]] = {
        METHOD_SWEEP: sweep_thresholds(record, grid, progress=progress, method="threshold"),
        METHOD_PATIENCE: sweep_patience(record),
    }
    points: dict[str, PolicyPoint] = {
        METHOD_FULL: evaluate_policy(record, "full"),
        METHOD_ORACLE: evaluate_policy(record, "oracle"),
        METHOD_FIXED: evaluate_policy(
            record, "threshold", thresholds=[0.5] * record.num_exits, score="max_softmax"
        ),
    }
    if operating_thresholds is not None:
        points[METHOD_OPERATING] = evaluate_policy(
            record, "threshold", thresholds=operating_thresholds
        )
    if sdn_record is not None:
        curves[METHOD_SDN] = sweep_thresholds(
            sdn_record, grid, progress=progress, method="threshold"
        )
        if sdn_thresholds is not None:
            points[METHOD_SDN_OPERATING] = evaluate_policy(
                sdn_record, "threshold", thresholds=sdn_thresholds
            )
    return {"curves": curves, "points": points}
