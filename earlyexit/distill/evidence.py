"""Which served samples become calibration evidence, and the evidence kept.

Two decisions, both blind to what the heads say about a sample:

* :class:`ContentSplit`: a seeded hash of each image's content sends it, once and for all, to the
  training side (it may teach the heads) or the calibration side (it may only be evidence), so a
  repeated request never leaks training data into the evidence.
* :class:`Evidence`: the audit coins (which early-answered, held-out samples still run to the end
  so their answer can be checked) and the ring of held-out samples the thresholds are tested on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import expect_dict
from ..errors import CheckpointError
from .buffers import (
    TensorRing,
    check_ring_state,
    feature_fields,
    ring_from_state,
    ring_state,
    saved_fields,
)
from .config import DistillConfig
from .trainer import check_generator_state

#: Side of the pooled thumbnail hashed to route a sample's content to train or calibration.
HASH_SIDE = 8


class ContentSplit:
    """Seeded content hash: True where an image is held out for calibration.

    Content-based, so the same image always lands on the same side; about
    ``calibration_fraction`` of contents are held out.

    Example:
        >>> split = ContentSplit(seed=0, calibration_fraction=0.4)
        >>> x = torch.rand(5, 3, 16, 16)
        >>> torch.equal(split.is_calibration(x), split.is_calibration(x.clone()))
        True
    """

    def __init__(self, seed: int, calibration_fraction: float) -> None:
        self.calibration_fraction = calibration_fraction
        # A pure function of the seed: rebuilt, never saved.
        self.projection = torch.randn(
            3 * HASH_SIDE * HASH_SIDE,
            generator=torch.Generator().manual_seed(seed + 2),
            dtype=torch.float64,
        )

    def is_calibration(self, x: Tensor) -> Tensor:
        """``[B]`` bool (on the CPU): whether each image's content is held out for calibration."""
        thumb = F.adaptive_avg_pool2d(x.detach().float(), HASH_SIDE)
        if thumb.shape[1] != 3:  # fold any channel count onto three hash channels
            thumb = torch.stack([thumb[:, i::3].sum(dim=1) for i in range(3)], dim=1)
        value = thumb.flatten(1).double().cpu() @ self.projection
        u = torch.frac(value.abs() * 7919.0)  # the fine digits of a random projection: ~uniform
        return u < self.calibration_fraction


def draw_audit_coins(
    calibration_side: Tensor,
    gates_closed: bool,
    share: float,
    calibration_fraction: float,
    rng: torch.Generator,
    teach_rate: float = 0.0,
) -> Tensor:
    """``[B]`` bool: which samples run to the end even if a head answers them, when ``share`` of
    all traffic is to be audited (see :meth:`Evidence.draw_audits`; a serving replica elsewhere
    draws with the share its learner published), and ``teach_rate`` of the training-side samples
    is drawn to teach (see ``DistillConfig.replay_after_open``).

    Example:
        >>> held_out = torch.tensor([True, False, True])
        >>> draw_audit_coins(held_out, True, 0.05, 0.4, torch.Generator()).tolist()
        [True, True, True]
    """
    batch = calibration_side.shape[0]
    if gates_closed:
        return torch.ones(batch, dtype=torch.bool)
    rate = min(1.0, share / calibration_fraction)
    coin = torch.rand(batch, generator=rng) < rate
    audited = coin & calibration_side
    if teach_rate > 0:
        teach = torch.rand(batch, generator=rng) < teach_rate
        audited = audited | (teach & ~calibration_side)
    return audited


class Evidence:
    """Audit sampling and the ring of held-out evidence (most recent ``evidence_samples``).

    The ring is built at the first sample (when the shapes of the features are known), see
    :meth:`build`. Not thread-safe: the learner calls it under its lock.

    Example:
        >>> evidence = Evidence(DistillConfig(audit_rate=0.05, audit_boost=0.25))
        >>> evidence.audit_share()  # no evidence yet: the boosted share
        0.25
    """

    def __init__(self, config: DistillConfig) -> None:
        self.config = config
        self.rng = torch.Generator().manual_seed(config.seed)
        self.ring: TensorRing | None = None
        # What :meth:`snapshot` copies into (the ring it was made for, and its tensors).
        self._copy: tuple[TensorRing, dict[str, Tensor]] | None = None

    # ------------------------------------------------------------------ audits
    def audit_share(self) -> float:
        """Share of traffic audited now: ``audit_rate``, raised towards ``audit_boost`` while the
        held-out evidence is short of ``evidence_target`` (the bound that decides how far gates
        may open tightens with every evidence sample; once there is enough, audits cost more than
        they teach)."""
        cfg = self.config
        have, target = 0, cfg.evidence_target
        if self.ring is not None:  # a memory cap may hold fewer than the target
            have, target = len(self.ring), min(target, self.ring.capacity)
        shortfall = max(0.0, 1.0 - have / target) if target else 0.0
        return cfg.audit_rate + max(0.0, cfg.audit_boost - cfg.audit_rate) * shortfall

    def draw_audits(self, calibration_side: Tensor, gates_closed: bool) -> Tensor:
        """``[B]`` bool: the samples to run to the end even if a head answers them.

        With every gate closed everything runs to the end anyway (all of it is evidence or
        teaches). Otherwise held-out contents are audited, at the rate that audits
        :meth:`audit_share` of all traffic (every such sample is then evidence), and
        training-side contents at ``teaching_rate`` (they teach: a uniform sample of the
        training side, where the samples that ran to the end on their own are the hard ones).
        """
        return draw_audit_coins(
            calibration_side,
            gates_closed,
            self.audit_share(),
            self.config.calibration_fraction,
            self.rng,
            self.config.teaching_rate,
        )

    # ------------------------------------------------------------------ the ring
    def build(
        self,
        fields: dict[str, tuple[tuple[int, ...], torch.dtype]],
        capacity: int,
        device: torch.device,
    ) -> None:
        """Allocate the ring: features ``z{i}`` of every exit and the teacher's label."""
        self.ring = TensorRing(capacity, {**fields, "teacher": ((), torch.long)}, device)
        self._copy = None

    def __len__(self) -> int:
        return len(self.ring) if self.ring is not None else 0

    def add(self, zs: list[Tensor], label: Tensor) -> None:
        """Keep held-out samples: their features at every exit and the full model's answer."""
        assert self.ring is not None, "build() first"
        self.ring.add(**{f"z{i}": z for i, z in enumerate(zs)}, teacher=label)

    def snapshot(self) -> dict[str, Tensor]:
        """A copy of every row kept (``z0 .. z{E-1}``, ``teacher``), safe to use unlocked until
        the next snapshot (the learner takes one per calibration, one calibration at a time).

        The copy goes into one buffer the size of the ring, allocated (and zeroed, like the ring)
        at the first snapshot and reused by every later one: memory is taken once. Why not a
        fresh clone per calibration: that is a block as large as the evidence (tens of MB), a
        little larger every time, and the allocator keeps the freed ones in the process, each
        too small for the next. Behind Ray Serve the learner's resident memory grew by tens of
        MB a calibration without a plateau while the memory in use stayed flat (the other such
        block was the heads' activations, see :func:`~.trainer.classify_all`).

        Example:
            >>> evidence = Evidence(DistillConfig())
            >>> evidence.build({"z0": ((2,), torch.float32)}, capacity=8, device=torch.device("cpu"))
            >>> evidence.add([torch.ones(3, 2)], torch.tensor([0, 1, 2]))
            >>> evidence.snapshot()["teacher"].tolist()
            [0, 1, 2]
        """
        ring = self.ring
        assert ring is not None, "build() first"
        if self._copy is None or self._copy[0] is not ring:
            self._copy = ring, {k: torch.zeros_like(v) for k, v in ring.data.items()}
        size = len(ring)
        return {k: self._copy[1][k][:size].copy_(v) for k, v in ring.view().items()}

    def clear(self) -> None:
        """Forget the evidence (after drift it no longer describes the traffic)."""
        if self.ring is not None:
            self.ring.clear()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Checkpoint tensors (audit random state, ring rows) and JSON (ring description)."""
        tensors: dict[str, Tensor] = {"rng.audit": self.rng.get_state()}
        rings: dict[str, Any] = {}
        if self.ring is not None:
            ring_tensors, rings["evidence"] = ring_state("evidence", self.ring)
            tensors.update(ring_tensors)
        return tensors, {"rings": rings}

    def load_state_dict(
        self, tensors: dict[str, Tensor], state: dict[str, Any], device: torch.device
    ) -> None:
        """Restore :meth:`state_dict` (``state`` may describe other rings too), checked first
        (:func:`check_evidence_state`): a bad state changes nothing."""
        check_evidence_state(tensors, state, self.config)
        self.rng.set_state(tensors["rng.audit"])
        meta = state["rings"].get("evidence")
        self.ring = None if meta is None else ring_from_state("evidence", meta, tensors, device)
        self._copy = None


def check_evidence_state(
    tensors: Any, state: Any, config: DistillConfig, num_exits: int | None = None
) -> None:
    """Check saved evidence (:meth:`Evidence.state_dict`): the audit random state, and the
    ring (features ``z0 .. z{E-1}`` in ``config.storage_dtype``, the teacher's int64 label) within
    ``evidence_samples`` rows, before anything is allocated. Raises a
    :class:`~earlyexit.CheckpointError` naming the field.

    Example:
        >>> evidence = Evidence(DistillConfig())
        >>> check_evidence_state(*evidence.state_dict(), evidence.config)
    """
    check_generator_state(tensors, "rng.audit")
    rings = expect_dict(expect_dict(state, "state", ("rings",))["rings"], "rings")
    meta = rings.get("evidence")
    if meta is None:
        if any(k.startswith("evidence.") for k in tensors):
            raise CheckpointError(
                "evidence tensors are saved but 'rings.evidence' does not describe them"
            )
        return
    if num_exits is None:  # on its own: as many feature fields as the file declares
        num_exits = sum(1 for k in saved_fields(meta, "evidence") if k != "teacher")
    fields = feature_fields(meta, "evidence", num_exits, config.storage_dtype)
    fields["teacher"] = ((), torch.int64)
    check_ring_state("evidence", meta, tensors, fields, config.evidence_samples)
