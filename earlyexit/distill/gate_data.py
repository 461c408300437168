"""The learned gate's training data: how the student saw traffic before it learned from it.

Training rows are held back (``pending``) until the student's view of them (per-exit confidence
features, agreement with the teacher) is recorded in a ring; only then do they join replay. So the
gate is fitted on traffic the heads had not trained on, which is how they meet new traffic.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, MAX_INT, expect_dict, expect_tensor
from ..errors import CheckpointError, ConfigError
from ..gates import AGREEMENT_FEATURES, Gate, LearnedGate, agreement_features, fit_learned_gate
from .buffers import (
    TensorRing,
    check_ring_state,
    physical_memory,
    ring_from_state,
    ring_state,
    row_bytes,
)
from .trainer import agreement

#: Training rows held back before the student's view of them is recorded at once.
PENDING_FLUSH = 256
#: Fewest training-side samples the learned gate is fitted on (below: max softmax).
MIN_GATE_SAMPLES = 128


class GateData:
    """Pending training rows and the ring of (features, agreement) records the gate is fitted on.

    Not thread-safe: the learner calls it under its lock (:meth:`fit` copies the ring first).

    Example:
        >>> data = GateData(num_exits=2)
        >>> data.hold([torch.randn(4, 8), torch.randn(4, 8)], torch.randn(4, 10))
        >>> data.pending_rows, data.flush_due(trained_samples=0, calibrating=False)
        (4, True)
    """

    def __init__(self, num_exits: int) -> None:
        self.num_exits = num_exits
        self.ring: TensorRing | None = None
        self.pending: list[tuple[list[Tensor], Tensor]] = []
        self.pending_rows = 0

    def build(self, capacity: int, device: torch.device) -> None:
        """Allocate the ring of per-exit features and agreement."""
        width = len(AGREEMENT_FEATURES)
        self.ring = TensorRing(
            capacity,
            {
                "features": ((self.num_exits, width), torch.float32),
                "agree": ((self.num_exits,), torch.bool),
            },
            device,
        )

    # ------------------------------------------------------------------ pending rows
    def hold(self, zs: list[Tensor], teacher: Tensor) -> None:
        """Hold training rows back from replay until the student's view of them is recorded."""
        self.pending.append((zs, teacher))
        self.pending_rows += teacher.shape[0]

    def flush_due(self, trained_samples: int, calibrating: bool) -> bool:
        """Whether to record the pending rows now: before a calibration, or once a block is full.
        Early on every row matters to heads that know nothing yet: flush every batch, then in
        blocks that grow with what replay already holds."""
        block = min(PENDING_FLUSH, trained_samples // 2)
        return bool(self.pending) and (calibrating or self.pending_rows >= block)

    def take_pending(self) -> tuple[list[Tensor], Tensor] | None:
        """The pending rows as one block (features per exit, teacher logits), now released."""
        block = self.peek_pending()
        self.release_pending(len(self.pending))
        return block

    def peek_pending(self) -> tuple[list[Tensor], Tensor] | None:
        """The pending rows as one block (features per exit, teacher logits), still pending:
        release them with :meth:`release_pending` once they are recorded (nothing is lost if
        recording fails)."""
        pending = self.pending
        if not pending:
            return None
        zs = [torch.cat([chunk[0][i] for chunk in pending]) for i in range(len(pending[0][0]))]
        return zs, torch.cat([chunk[1] for chunk in pending])

    def release_pending(self, chunks: int) -> None:
        """Drop the oldest ``chunks`` held batches (those :meth:`peek_pending` returned; rows held
        since stay pending)."""
        released, self.pending = self.pending[:chunks], self.pending[chunks:]
        self.pending_rows -= sum(chunk[1].shape[0] for chunk in released)

    def record(self, logits: list[Tensor], target: Tensor) -> None:
        """Record the student's per-exit ``logits`` on rows whose full-model answer is ``target``."""
        if self.ring is None:  # built with the other buffers
            return
        with torch.no_grad():
            feats = [agreement_features(out, logits[:i]) for i, out in enumerate(logits)]
        self.ring.add(features=torch.stack(feats, 1), agree=agreement(logits, target))

    def forget(self) -> None:
        """Drop records and pending rows (how confidence maps to agreement may have moved)."""
        if self.ring is not None:
            self.ring.clear()
        self.pending, self.pending_rows = [], 0

    # ------------------------------------------------------------------ the gate
    def snapshot(self) -> dict[str, Tensor] | None:
        """A copy of the records (``features``, ``agree``), or None before the ring exists."""
        if self.ring is None:
            return None
        return {k: v.clone() for k, v in self.ring.view().items()}

    @staticmethod
    def fit(data: dict[str, Tensor] | None) -> tuple[Gate, str]:
        """A :class:`~earlyexit.gates.LearnedGate` fitted on ``data`` (from :meth:`snapshot`), and
        a word on how it was obtained; max softmax while there is too little (or bad) data."""
        if data is None or data["agree"].shape[0] < MIN_GATE_SAMPLES:
            have = 0 if data is None else data["agree"].shape[0]
            return LearnedGate(), (
                f"learned gate not fitted yet ({have}/{MIN_GATE_SAMPLES} samples): max softmax"
            )
        try:
            gate = fit_learned_gate(data["features"], data["agree"], min_samples=MIN_GATE_SAMPLES)
        except ConfigError as err:  # e.g. non-finite features: serve on, with the plain rule
            return LearnedGate(), f"learned gate not fitted ({err}): max softmax"
        return gate, f"learned gate fitted on {data['agree'].shape[0]} training-side samples"

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Checkpoint tensors (ring rows, pending rows) and JSON (ring description)."""
        tensors: dict[str, Tensor] = {}
        rings: dict[str, Any] = {}
        if self.ring is not None:
            ring_tensors, rings["gate_data"] = ring_state("gate_data", self.ring)
            tensors.update(ring_tensors)
        if self.pending:
            for i in range(len(self.pending[0][0])):
                tensors[f"pending.z{i}"] = torch.cat([chunk[0][i] for chunk in self.pending])
            tensors["pending.teacher"] = torch.cat([chunk[1] for chunk in self.pending])
        return tensors, {"rings": rings}

    def load_state_dict(
        self, tensors: dict[str, Tensor], state: dict[str, Any], device: torch.device
    ) -> None:
        """Restore :meth:`state_dict` (``state`` may describe other rings too), checked first
        (:func:`check_gate_data_state`): a bad state changes nothing."""
        check_gate_data_state(tensors, state, self.num_exits)
        meta = state["rings"].get("gate_data")
        self.ring = None if meta is None else ring_from_state("gate_data", meta, tensors, device)
        self.pending, self.pending_rows = [], 0
        if "pending.teacher" in tensors:
            zs = [tensors[f"pending.z{i}"] for i in range(self.num_exits)]
            self.hold(zs, tensors["pending.teacher"])


def gate_data_fields(num_exits: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The fields of the gate data ring for ``num_exits`` exits (what :meth:`GateData.build`
    allocates)."""
    width = len(AGREEMENT_FEATURES)
    return {
        "features": ((num_exits, width), torch.float32),
        "agree": ((num_exits,), torch.bool),
    }


def check_gate_data_state(
    tensors: Any,
    state: Any,
    num_exits: int,
    max_capacity: int | None = None,
    z_shapes: list[tuple[int, ...]] | None = None,
    num_classes: int | None = None,
) -> None:
    """Check saved gate data (:meth:`GateData.state_dict`) before anything is allocated: the
    ring's fields, capacity (at most ``max_capacity`` rows, never more than this machine's
    memory) and rows; the pending rows (features of every exit, of ``z_shapes`` when given, and
    the teacher's logits, ``num_classes`` wide when given, all with the same row count). Raises a
    :class:`~earlyexit.CheckpointError` naming the field.

    Example:
        >>> check_gate_data_state(*GateData(num_exits=2).state_dict(), num_exits=2)
    """
    rings = expect_dict(expect_dict(state, "state", ("rings",))["rings"], "rings")
    meta = rings.get("gate_data")
    fields = gate_data_fields(num_exits)
    if meta is not None:
        if max_capacity is None:
            max_capacity = max(1, min(MAX_INT, physical_memory() // row_bytes(fields)))
        check_ring_state("gate_data", meta, tensors, fields, max_capacity)
    elif any(k.startswith("gate_data.") for k in tensors):
        raise CheckpointError(
            "gate data tensors are saved but 'rings.gate_data' does not describe them"
        )
    pending = sorted(k for k in tensors if k.startswith("pending."))
    if not pending:
        return
    names = [f"pending.z{i}" for i in range(num_exits)] + ["pending.teacher"]
    if sorted(names) != pending:
        raise CheckpointError(f"pending rows: expected tensors {names}, got {pending}")
    teacher = expect_tensor(tensors, "pending.teacher", FLOAT_DTYPES, (None, num_classes))
    rows = teacher.shape[0]
    for i in range(num_exits):
        key = f"pending.z{i}"
        row = z_shapes[i] if z_shapes is not None else tuple(tensors[key].shape[1:])
        if not row:
            raise CheckpointError(f"tensor {key!r}: expected rows of features, got a vector")
        expect_tensor(tensors, key, FLOAT_DTYPES, (rows, *row))
