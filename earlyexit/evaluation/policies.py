"""Exit policies replayed on a recorded stream, and the figures of each operating point.

A policy returns, per sample, the path it took (``0..E-1`` an exit, ``E`` the full model):
thresholds on the gate scores (the rule serving applies, from :mod:`earlyexit.routing`, so the
simulation is exact: tests check it against ``eem.predict``), PABEE patience, or the oracle.
:func:`evaluate_exits` turns a path per sample into MACs, agreement, accuracy and exit rates;
the sweeps trace whole trade-off curves.

Example:
    >>> rec = record_stream(eem, images, labels=labels)  # doctest: +SKIP
    >>> point = evaluate_policy(rec, "threshold", thresholds=[0.9, 0.9, 0.9, 0.9])  # doctest: +SKIP
    >>> point.mac_saving, point.agreement  # doctest: +SKIP
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from .._json import json_float
from ..routing import first_exit, simulate_exits
from .stream import StreamRecord

__all__ = [
    "PolicyPoint",
    "default_grid",
    "evaluate_exits",
    "evaluate_policy",
    "oracle_exits",
    "patience_exits",
    "sweep_patience",
    "sweep_thresholds",
    "threshold_exits",
]


# ------------------------------------------------------------------------------------ policies


def threshold_exits(
    record: StreamRecord, thresholds: Sequence[float], *, score: str = "gate"
) -> Tensor:
    """Path of each sample under per-exit thresholds: the first exit with ``score >= threshold``.

    ``score="gate"`` compares the recorded gate scores (what the wrapper does); ``"max_softmax"``
    the heads' largest softmax probability (the classic fixed-threshold baseline).

    Example:
        >>> threshold_exits(rec, [0.9, 0.8, 0.8, 0.8])  # doctest: +SKIP
        tensor([0, 4, 2, ...])
    """
    values = {"gate": record.scores, "max_softmax": record.max_prob}.get(score)
    if values is None:
        raise ValueError(f"score must be 'gate' or 'max_softmax', got {score!r}")
    if len(thresholds) != record.num_exits:
        raise ValueError(f"expected {record.num_exits} thresholds, got {len(thresholds)}")
    return simulate_exits(values, thresholds)


def patience_exits(record: StreamRecord, patience: int) -> Tensor:
    """PABEE: leave at the first exit where the argmax has been unchanged for ``patience`` exits.

    A counter goes up by one at each exit whose argmax equals the previous exit's and back to zero
    otherwise; the sample leaves when it reaches ``patience`` (so ``patience=1`` leaves at the first
    exit ``i >= 1`` that agrees with exit ``i - 1``). No label, threshold or score is used.

    Example:
        >>> patience_exits(rec, 2)  # doctest: +SKIP
    """
    if patience < 1:
        raise ValueError(f"patience must be at least 1, got {patience}")
    n, e = record.preds.shape
    count = torch.zeros(n, dtype=torch.long)
    leave = torch.zeros(n, e, dtype=torch.bool)
    for i in range(1, e):
        same = record.preds[:, i] == record.preds[:, i - 1]
        count = torch.where(same, count + 1, torch.zeros_like(count))
        leave[:, i] = count >= patience
    return first_exit(leave)


def oracle_exits(record: StreamRecord) -> Tensor:
    """The oracle: each sample leaves at the first head whose argmax equals the full model's.

    Example:
        >>> oracle_exits(rec)  # doctest: +SKIP
    """
    return first_exit(record.preds == record.final_pred[:, None])


# ------------------------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class PolicyPoint:
    """One operating point of one policy on one stream.

    Attributes:
        method: e.g. ``"threshold"``, ``"patience"``, ``"oracle"``, ``"full"``.
        param: the swept parameter (shared threshold, patience), if any.
        thresholds: per-exit thresholds, for threshold policies.
        expected_macs: mean per-sample MACs of the paths taken (heads evaluated on the way included).
        mac_fraction: ``expected_macs / base_macs``.
        mac_saving: ``1 - mac_fraction``.
        agreement: share of samples whose answer equals the full model's argmax.
        accuracy: share equal to the label (``None`` without labels).
        exit_rates: per path (``E`` exits, then the full model), the share of samples taking it.
        exit_agreement: per path, agreement among the samples taking it (``None`` where none did).
    """

    method: str
    param: float | None
    thresholds: tuple[float, ...] | None
    expected_macs: float
    mac_fraction: float
    mac_saving: float
    agreement: float
    accuracy: float | None
    exit_rates: tuple[float, ...]
    exit_agreement: tuple[float | None, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite thresholds as the strings ``"inf"`` / ``"-inf"``)."""
        out = asdict(self)
        if self.thresholds is not None:
            out["thresholds"] = [json_float(t) for t in self.thresholds]
        out["param"] = json_float(self.param)
        return out


def evaluate_exits(
    record: StreamRecord,
    exit_index: Tensor,
    *,
    thresholds: Sequence[float] | None = None,
    method: str = "custom",
    param: float | None = None,
) -> PolicyPoint:
    """Cost and quality of a policy given the path each sample took.

    Cost per sample is the MACs of its path under ``thresholds`` (closed exits' heads skipped, as
    the wrapper does); without ``thresholds`` every head on the way is paid for (policies such as
    patience or the oracle that look at every head).

    Example:
        >>> evaluate_exits(rec, oracle_exits(rec), method="oracle").mac_saving  # doctest: +SKIP
        0.61
    """
    n, e = record.num_samples, record.num_exits
    if exit_index.shape != (n,):
        raise ValueError(f"exit_index must have shape ({n},), got {tuple(exit_index.shape)}")
    exit_index = exit_index.long().cpu()
    costs = torch.tensor(record.path_macs(thresholds), dtype=torch.float64)
    expected = float(costs[exit_index].mean())
    preds = torch.cat([record.preds, record.final_pred[:, None]], 1)
    answer = preds.gather(1, exit_index[:, None]).squeeze(1)
    agree = answer == record.final_pred
    counts = torch.bincount(exit_index, minlength=e + 1)
    agree_counts = torch.bincount(exit_index[agree], minlength=e + 1)
    rates = tuple(float(c) / n for c in counts)
    per_exit = tuple(
        float(a) / float(c) if c > 0 else None for a, c in zip(agree_counts, counts, strict=True)
    )
    accuracy = None
    if record.labels is not None:
        accuracy = float((answer == record.labels).float().mean())
    fraction = expected / record.base_macs
    return PolicyPoint(
        method=method,
        param=param,
        thresholds=None if thresholds is None else tuple(float(t) for t in thresholds),
        expected_macs=expected,
        mac_fraction=fraction,
        mac_saving=1.0 - fraction,
        agreement=float(agree.float().mean()),
        accuracy=accuracy,
        exit_rates=rates,
        exit_agreement=per_exit,
    )


def evaluate_policy(
    record: StreamRecord,
    policy: str,
    *,
    thresholds: Sequence[float] | None = None,
    patience: int | None = None,
    score: str = "gate",
) -> PolicyPoint:
    """Simulate a named policy on a recorded stream.

    ``policy``: ``"threshold"`` (needs ``thresholds``; ``score`` as in :func:`threshold_exits`),
    ``"patience"`` (needs ``patience``), ``"oracle"``, or ``"full"`` (every sample runs to the end,
    no head evaluated).

    Example:
        >>> evaluate_policy(rec, "threshold", thresholds=eem.thresholds).agreement  # doctest: +SKIP
    """
    e = record.num_exits
    if policy == "threshold":
        if thresholds is None:
            raise ValueError("the threshold policy needs thresholds")
        return evaluate_exits(
            record,
            threshold_exits(record, thresholds, score=score),
            thresholds=thresholds,
            method="threshold",
        )
    if policy == "patience":
        if patience is None:
            raise ValueError("the patience policy needs patience")
        return evaluate_exits(
            record, patience_exits(record, patience), method="patience", param=patience
        )
    if policy == "oracle":
        return evaluate_exits(record, oracle_exits(record), method="oracle")
    if policy == "full":
        closed = [math.inf] * e
        return evaluate_exits(
            record, torch.full((record.num_samples,), e), thresholds=closed, method="full"
        )
    raise ValueError(f"unknown policy {policy!r}; use threshold, patience, oracle or full")


def default_grid(record: StreamRecord, levels: int = 41, *, score: str = "gate") -> list[float]:
    """Shared thresholds for a sweep: ``inf``, quantiles of the observed scores, ``-inf``.

    Example:
        >>> default_grid(rec)[0], default_grid(rec)[-1]  # doctest: +SKIP
        (inf, -inf)
    """
    values = (record.scores if score == "gate" else record.max_prob).flatten().double()
    values = values[torch.isfinite(values)]
    qs = []
    if values.numel():
        qs = torch.quantile(values, torch.linspace(0, 1, levels, dtype=torch.float64)).tolist()
    grid = sorted(set(qs), reverse=True)
    return [math.inf, *grid, -math.inf]


def sweep_thresholds(
    record: StreamRecord,
    grid: Sequence[float] | None = None,
    *,
    score: str = "gate",
    method: str = "threshold",
    progress: bool = False,
) -> list[PolicyPoint]:
    """The trade-off curve of one shared threshold applied at every exit.

    ``grid`` defaults to :func:`default_grid`; ``inf`` (all gates closed: the full model, saving 0,
    agreement 1) and ``-inf`` (everything leaves at exit 0) are always included. Points come in the
    order of ``grid`` (descending thresholds by default: MACs fall along the curve).

    Example:
        >>> curve = sweep_thresholds(rec)  # doctest: +SKIP
        >>> curve[0].agreement, curve[0].mac_saving  # doctest: +SKIP
        (1.0, 0.0)
    """
    from tqdm.auto import tqdm

    if grid is None:
        grid = default_grid(record, score=score)
    points = []
    e = record.num_exits
    for t in tqdm(list(grid), desc=f"sweep {method}", disable=not progress, file=sys.stderr):
        thresholds = [float(t)] * e
        exits = threshold_exits(record, thresholds, score=score)
        points.append(
            evaluate_exits(record, exits, thresholds=thresholds, method=method, param=float(t))
        )
    return points


def sweep_patience(
    record: StreamRecord, patiences: Iterable[int] | None = None
) -> list[PolicyPoint]:
    """PABEE's trade-off curve: one point per patience (default ``1 .. E-1``).

    Example:
        >>> [p.param for p in sweep_patience(rec)]  # doctest: +SKIP
        [1, 2, 3]
    """
    if patiences is None:
        patiences = range(1, max(record.num_exits, 2))
    return [evaluate_policy(record, "patience", patience=int(t)) for t in patiences]
