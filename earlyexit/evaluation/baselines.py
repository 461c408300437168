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
from dataclasses import dataclass, replace
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
    "METHOD_RECIPE",
    "METHOD_SDN",
    "METHOD_SDN_OPERATING",
    "METHOD_SWEEP",
    "OfflineRecipe",
    "best_at_agreement",
    "calibrate_greedy",
    "compare_methods",
    "converge_heads",
    "first_threshold_reaching",
    "offline_recipe",
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
METHOD_RECIPE = "offline recipe: linear heads distilled offline, one max-softmax threshold"
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
        student = _fresh_copy(head)
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


def _fresh_copy(head: nn.Module) -> nn.Module:
    """A float32 CPU copy of ``head`` with re-initialised parameters, in train mode.

    A fresh start: the copy must not inherit what the wrapper's heads already learned (a baseline
    trained from the online heads' weights would not be a baseline). Initialisation draws from
    torch's global generator; seed it (or fork it) for reproducible heads.
    """
    student = copy.deepcopy(head).cpu().float().train()
    for module in student.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return student


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


# ------------------------------------------------------------------------------ offline recipe


def first_threshold_reaching(
    max_prob: Tensor,
    preds: Tensor,
    final_pred: Tensor,
    target: float,
    *,
    on: str = "exited",
    min_exits: int = 1,
) -> float:
    """The lowest shared max-softmax threshold at which a split first reaches ``target`` agreement.

    Candidates are the split's own finite scores, scanned upwards (from "everything leaves at the
    first exit" towards "nothing leaves"); each sample leaves at the first exit whose score is
    ``>=`` the candidate. The first candidate whose agreement with the full model reaches
    ``target`` is returned, ``inf`` (every gate closed) if none does. A point estimate on this
    split, with no confidence bound: what a practitioner's offline recipe does, not what the
    library's calibration does. Since a shared threshold can only let fewer samples out as it
    rises, the first candidate reaching the target is also the one that saves most on this split.

    Args:
        max_prob: ``[N, E]`` each head's largest softmax probability (NaN never leaves).
        preds: ``[N, E]`` each head's argmax.
        final_pred: ``[N]`` the full model's argmax.
        target: agreement to reach, in ``(0, 1]``.
        on: ``"exited"``: agreement among the samples that leave early (what the online
            calibration's target means); ``"all"``: over every sample (those that run to the end
            agree by definition).
        min_exits: a candidate counts only if at least this many samples leave.

    Example:
        >>> p = torch.tensor([[0.9], [0.8], [0.7]])
        >>> first_threshold_reaching(p, torch.tensor([[1], [1], [2]]), torch.tensor([1, 1, 1]), 0.99)
        0.800000011920929
    """
    if max_prob.dim() != 2 or preds.shape != max_prob.shape:
        raise ValueError(
            f"max_prob and preds must both be [N, E]; got {tuple(max_prob.shape)} and "
            f"{tuple(preds.shape)}"
        )
    if final_pred.shape != (max_prob.shape[0],):
        raise ValueError(
            f"final_pred must be [N] = [{max_prob.shape[0]}], got {tuple(final_pred.shape)}"
        )
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    if on not in ("exited", "all"):
        raise ValueError(f"on must be 'exited' or 'all', got {on!r}")
    if min_exits < 1:
        raise ValueError(f"min_exits must be >= 1, got {min_exits}")
    n = max_prob.shape[0]
    agree = preds == final_pred[:, None]
    scores = max_prob.double()
    for t in torch.unique(scores[torch.isfinite(scores)]).tolist():  # ascending
        fires = scores >= t
        left = fires.any(dim=1)
        n_left = int(left.sum())
        if n_left < min_exits:
            continue
        first = fires.int().argmax(dim=1)
        ok = int((agree.gather(1, first[:, None]).squeeze(1) & left).sum())
        rate = ok / n_left if on == "exited" else (ok + n - n_left) / n
        if rate >= target:
            return float(t)
    return math.inf


@dataclass
class OfflineRecipe:
    """The offline recipe, trained and calibrated: what it serves and how it got there.

    ``eem`` is a linear-head wrapper on a *copy* of the base model, at the given exit modules,
    serving the distilled heads at one shared max-softmax ``threshold`` (the base model passed to
    :func:`offline_recipe` is never touched). See :func:`offline_recipe`.
    """

    eem: Any
    threshold: float
    target: float
    on: str
    traffic_samples: int
    calibration_samples: int
    calibration_point: PolicyPoint
    epochs: int
    temperature: float
    train_loss: list[float]

    @property
    def heads(self) -> list[nn.Module]:
        """The trained heads (the ones ``eem`` serves)."""
        return list(self.eem.heads)

    def record(self, data: Any, *, labels: Tensor | None = None, batch_size: int = 64) -> Any:
        """``data`` served by the recipe, every head on every sample (``record_stream``);
        ``served_exit`` is where the recipe answered each one."""
        from .stream import record_stream

        return record_stream(self.eem, data, labels=labels, batch_size=batch_size)

    def evaluate(self, record: StreamRecord) -> PolicyPoint:
        """The recipe's point (one shared max-softmax threshold) replayed on a :meth:`record`."""
        thresholds = [self.threshold] * record.num_exits
        point = evaluate_policy(record, "threshold", thresholds=thresholds, score="max_softmax")
        return replace(point, method=METHOD_RECIPE, param=self.threshold)

    def to_dict(self) -> dict[str, Any]:
        """How the recipe was built, as plain numbers (for reports)."""
        return {
            "threshold": self.threshold,
            "target": self.target,
            "on": self.on,
            "exits": [e.name for e in self.eem.exits],
            "head_macs": list(self.eem.head_macs),
            "traffic_samples": self.traffic_samples,
            "calibration_samples": self.calibration_samples,
            "calibration_split": "the last calibration_samples of the traffic, in stream order "
            "(the heads were trained on them too)",
            "calibration_agreement": self.calibration_point.agreement,
            "calibration_exit_rate": 1.0 - self.calibration_point.exit_rates[-1],
            "epochs": self.epochs,
            "temperature": self.temperature,
            "train_loss": self.train_loss,
        }


def offline_recipe(
    model: nn.Module,
    traffic: Any,
    *,
    exits: Sequence[str | int],
    input_size: tuple[int, int, int] | None = None,
    target: float = 0.99,
    on: str = "exited",
    calibration_share: float = 0.25,
    epochs: int = 15,
    temperature: float = 2.0,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    seed: int = 0,
    record_batch_size: int = 64,
) -> OfflineRecipe:
    """The usual offline recipe, as a yardstick for the online learner on the same traffic.

    1. Wrap a copy of ``model`` with linear heads (global average pool + fc) at ``exits`` (pass
       the online wrapper's exit names: same exit modules) and a max-softmax gate.
    2. One backbone pass over *all* of ``traffic`` caches each exit's pooled feature and the full
       model's logits; labels in ``traffic``, if any, are never used.
    3. Distil each head from the final logits (KL at ``temperature``, :func:`train_heads`) for
       ``epochs`` epochs over the whole traffic: unlike the online learner, it has seen the future.
    4. Calibrate ONE shared max-softmax threshold on the last ``calibration_share`` of the traffic
       (in stream order): the first threshold at which that split reaches ``target`` agreement
       (:func:`first_threshold_reaching`; ``on="exited"``: among early exits, as the online
       target). A point estimate, no confidence bound; the heads were trained on that split too.

    Serve or replay it on held-out traffic with :meth:`OfflineRecipe.record` and
    :meth:`OfflineRecipe.evaluate`.

    Example:
        >>> recipe = offline_recipe(model, x_traffic, exits=[e.name for e in eem.exits])  # doctest: +SKIP
        >>> recipe.evaluate(recipe.record(x_eval)).mac_saving  # doctest: +SKIP
    """
    from ..wrapping import wrap
    from .stream import record_stream

    if not 0.0 < calibration_share <= 1.0:
        raise ValueError(f"calibration_share must be in (0, 1], got {calibration_share}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if on not in ("exited", "all"):
        raise ValueError(f"on must be 'exited' or 'all', got {on!r}")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    eem = wrap(
        copy.deepcopy(model),
        exits=list(exits),
        head="linear",
        gate="max_softmax",
        input_size=input_size,
    )
    rec = record_stream(eem, traffic, batch_size=record_batch_size, keep_features=True)
    assert rec.features is not None and rec.final_logits is not None
    losses: list[float] = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # head initialisation, reproducible without touching the caller's
        heads = train_heads(
            eem.heads,
            rec.features,
            rec.final_logits,
            objective="distill",
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            temperature=temperature,
            seed=seed,
        )
    with torch.no_grad():
        for head, z in zip(heads, rec.features, strict=True):
            losses.append(float(distillation_loss(head.classify(z), rec.final_logits, temperature)))
        for served, trained in zip(eem.heads, heads, strict=True):
            served.load_state_dict(trained.state_dict())
    scored = rec.with_heads(heads, eem.gate)
    n = scored.num_samples
    n_cal = max(1, round(calibration_share * n))
    cal = scored.subset(slice(n - n_cal, n))
    threshold = first_threshold_reaching(cal.max_prob, cal.preds, cal.final_pred, target, on=on)
    thresholds = [threshold] * eem.num_exits
    eem.set_thresholds(thresholds)
    point = evaluate_policy(cal, "threshold", thresholds=thresholds, score="max_softmax")
    return OfflineRecipe(
        eem=eem,
        threshold=threshold,
        target=target,
        on=on,
        traffic_samples=n,
        calibration_samples=n_cal,
        calibration_point=point,
        epochs=epochs,
        temperature=temperature,
        train_loss=losses,
    )


def converge_heads(
    heads: Sequence[nn.Module],
    features: Sequence[Tensor],
    teacher_logits: Tensor,
    *,
    temperature: float = 2.0,
    epochs: int = 40,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    seed: int = 0,
) -> tuple[list[nn.Module], list[list[float]]]:
    """Fresh copies of ``heads`` (the same head kind, re-initialised) distilled offline from
    ``teacher_logits`` on recorded ``features`` for many epochs, the learning rate annealed to zero
    (cosine), so they settle: the reference the online heads are held to ("within a point of the
    agreement the same heads reach offline, trained to convergence").

    Returns the heads (eval mode, CPU) and, per head, the distillation loss over all of
    ``features`` after every epoch, so a caller can check the curve has flattened.

    Example:
        >>> rec = record_stream(eem, x_traffic, keep_features=True)  # doctest: +SKIP
        >>> heads, curves = converge_heads(eem.heads, rec.features, rec.final_logits)  # doctest: +SKIP
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if len(heads) != len(features):
        raise ValueError(f"{len(heads)} heads but {len(features)} feature sets")
    generator = torch.Generator().manual_seed(seed)
    trained: list[nn.Module] = []
    curves: list[list[float]] = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for head, z in zip(heads, features, strict=True):
            student = _fresh_copy(head)
            curve: list[float] = []

            def measure(_epoch: int, student: nn.Module = student, z: Tensor = z, curve=curve):
                with torch.no_grad():
                    student.eval()
                    total = 0.0
                    for start in range(0, z.shape[0], 1024):
                        logits = student.classify(z[start : start + 1024].float())
                        part = teacher_logits[start : start + 1024]
                        total += float(distillation_loss(logits, part, temperature)) * part.shape[0]
                    curve.append(total / z.shape[0])

            fit_head(
                student,
                z,
                teacher_logits,
                lambda logits, target: distillation_loss(logits, target, temperature),
                epochs=epochs,
                lr=lr,
                weight_decay=weight_decay,
                batch_size=batch_size,
                generator=generator,
                cosine_schedule=True,
                after_epoch=measure,
            )
            trained.append(student.eval())
            curves.append(curve)
    return trained, curves
