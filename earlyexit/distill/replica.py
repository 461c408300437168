"""Serving away from the learner: replicas serve and gather teacher signals, one learner learns.

A service that outgrows one process runs several copies of the wrapped model. Each copy is a
:class:`ServingReplica`: it serves with the heads, gate and thresholds its learner last released,
draws its own audits, and returns with every answer the :class:`~.rows.BatchRows` of the batch
(counts, MACs spent, audit outcomes, and for the samples that ran to the end their head inputs and
the full model's logits: features, never images). One :class:`~earlyexit.OnlineDistiller` takes
the rows of every replica (:meth:`~earlyexit.OnlineDistiller.record`), trains and calibrates, and
hands out a :class:`HeadsRelease` (:meth:`~earlyexit.OnlineDistiller.release`) that each replica
installs between two batches, whole: no batch is ever served with a mix of versions.

Which contents are held out is the same seeded hash in every replica (a repeated image lands on
the same side whichever replica serves it); the audit coins are each replica's own, seeded from
the learner's seed and the replica's index (replica 0 draws exactly what the learner's own
:meth:`~earlyexit.OnlineDistiller.step` would).

Example:
    >>> learner = ee.OnlineDistiller(ee.wrap(model), ee.DistillConfig(background=True))  # doctest: +SKIP
    >>> replica = ServingReplica(ee.wrap(model), learner.config, index=0)  # doctest: +SKIP
    >>> replica.install(learner.release())  # doctest: +SKIP
    >>> result, rows = replica.serve(x)  # answers, and what the learner learns from  # doctest: +SKIP
    >>> learner.record(rows, serve_seconds=0.01)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..gates import Gate
from ..model import EarlyExitModel, ExitResult
from .config import DistillConfig
from .evidence import ContentSplit, draw_audit_coins
from .rows import BatchRows, sort_rows

__all__ = ["HeadsRelease", "ServingReplica"]

#: Spacing of the replicas' audit seeds (replica ``i`` draws from ``seed + i * AUDIT_SEED_STRIDE``).
AUDIT_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class HeadsRelease:
    """What a learner hands its replicas: everything that decides an answer, as one value.

    Attributes:
        version: the learner's ``heads_version`` (grows with every publication and every closing
            of the gates by the drift monitor); a replica installs only a newer one.
        heads: the exit heads (an ``nn.ModuleList``, never changed after release).
        gate: the gate scoring them.
        thresholds: one per exit (``inf``: closed).
        audit_share: the share of traffic to audit now (more while evidence is short).
    """

    version: int
    heads: nn.ModuleList
    gate: Gate
    thresholds: tuple[float, ...]
    audit_share: float


class ServingReplica:
    """One copy of the wrapped model serving for a learner elsewhere (see the module docstring).

    Args:
        eem: this replica's wrapped model: the same base model, exits and head kinds as the
            learner's (its heads are replaced by every release; until the first, gates are closed).
        config: the learner's :class:`DistillConfig` (seed, calibration fraction, storage dtype).
        index: this replica's number (0, 1, ...): seeds its audit coins.

    Not thread-safe: call :meth:`serve` and :meth:`install` from one thread (or one at a time).
    """

    def __init__(self, eem: EarlyExitModel, config: DistillConfig, index: int = 0) -> None:
        if not isinstance(eem, EarlyExitModel):
            raise ConfigError(f"ServingReplica needs an EarlyExitModel, got {type(eem).__name__}")
        if not isinstance(index, int) or index < 0:
            raise ConfigError(f"index must be an integer >= 0, got {index!r}")
        self.eem = eem
        self.config = config
        self.index = index
        self.split = ContentSplit(config.seed, config.calibration_fraction)
        self.rng = torch.Generator().manual_seed(config.seed + index * AUDIT_SEED_STRIDE)
        #: The version of the heads now served (-1: none installed yet, every gate closed).
        self.heads_version = -1
        self.audit_share = config.audit_boost  # no evidence yet: the boosted share
        eem.set_thresholds([math.inf] * eem.num_exits)

    def install(self, release: HeadsRelease) -> bool:
        """Serve ``release`` from the next batch on; returns whether it was newer than what is
        served (an older or equal version only updates the audit share)."""
        if not isinstance(release, HeadsRelease):
            raise ConfigError(f"expected a HeadsRelease, got {type(release).__name__}")
        self.audit_share = float(release.audit_share)
        if release.version <= self.heads_version:
            return False
        eem = self.eem
        if len(release.thresholds) != eem.num_exits or len(release.heads) != eem.num_exits:
            raise ConfigError(
                f"the release has {len(release.heads)} heads and {len(release.thresholds)} "
                f"thresholds; this replica's model has {eem.num_exits} exits"
            )
        # Close, swap heads and gate, open: the same order as the learner's own publication.
        eem.set_thresholds([math.inf] * eem.num_exits)
        eem.heads = release.heads
        eem.gate = release.gate
        eem.set_thresholds(release.thresholds)
        self.heads_version = int(release.version)
        return True

    def serve(self, x: Tensor) -> tuple[ExitResult, BatchRows]:
        """Answer a batch with the installed heads; returns the answers (caller's row order) and
        the rows its learner learns from, on the CPU (ready to send).

        Raises:
            InputError: a bad batch (shape, dtype, device, NaN/Inf, empty), before anything runs.
        """
        eem = self.eem
        eem.check_input(x)
        if x.shape[0] == 0:
            raise InputError("empty batch: there is nothing to serve or learn from")
        if eem.base_model.training:
            raise InputError("the base model is in training mode; call model.eval() before serving")
        gates_closed = all(t == math.inf for t in eem.thresholds)
        calibration_side = self.split.is_calibration(x)
        audit = draw_audit_coins(
            calibration_side,
            gates_closed,
            self.audit_share,
            self.config.calibration_fraction,
            self.rng,
            self.config.teaching_rate,
        )
        audit, calibration_side = audit.to(x.device), calibration_side.to(x.device)
        result, trace = eem.trace(x, audit=audit, input_checked=True)
        rows = sort_rows(eem, self.config, result, trace, audit, calibration_side)
        return result, _to_cpu(rows)


def _to_cpu(rows: BatchRows) -> BatchRows:
    def cpu(t: Any) -> Any:
        return t.detach().cpu() if isinstance(t, Tensor) else t

    zs = None if rows.zs is None else [cpu(z) for z in rows.zs]
    return rows._replace(
        zs=zs, teacher=cpu(rows.teacher), evidence=cpu(rows.evidence), train=cpu(rows.train)
    )
