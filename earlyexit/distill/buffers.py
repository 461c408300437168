"""Fixed-capacity rings of per-sample rows: bounded memory however long the stream runs.

Also how the learner sizes its rings under one memory cap, and writes/reads them in checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..gates import AGREEMENT_FEATURES
from .config import DistillConfig


class TensorRing:
    """Rows of several named tensors, oldest overwritten first; memory is allocated once.

    The ring keeps the most recent ``capacity`` samples, which also gives the evidence a recency
    window (old traffic ages out when the distribution drifts).

    Example:
        >>> ring = TensorRing(3, {"z": ((2,), torch.float32)})
        >>> ring.add(z=torch.arange(8.0).reshape(4, 2))  # 4 rows: only the newest 3 are kept
        >>> len(ring), ring.view()["z"][:, 0].tolist()
        (3, [2.0, 4.0, 6.0])
        >>> ring.add(z=torch.full((1, 2), 9.0))  # the oldest row is overwritten
        >>> ring.view()["z"][:, 0].tolist()
        [9.0, 4.0, 6.0]
    """

    def __init__(
        self,
        capacity: int,
        fields: dict[str, tuple[tuple[int, ...], torch.dtype]],
        device: torch.device | str = "cpu",
    ) -> None:
        self.capacity = int(capacity)
        self.fields = dict(fields)
        self.data = {
            name: torch.zeros((self.capacity, *shape), dtype=dtype, device=device)
            for name, (shape, dtype) in self.fields.items()
        }
        self.size = 0
        self.head = 0  # next slot to write
        self.added = 0  # samples ever added (for stats)

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes held by the ring (fixed at construction)."""
        return sum(t.numel() * t.element_size() for t in self.data.values())

    def add(self, **rows: Tensor) -> None:
        """Append rows (all fields, same count); beyond capacity the oldest rows are overwritten."""
        n = next(iter(rows.values())).shape[0]
        if n == 0 or self.capacity == 0:
            return
        if n > self.capacity:  # only the newest rows can survive anyway
            rows = {k: v[n - self.capacity :] for k, v in rows.items()}
            n = self.capacity
        slots = (torch.arange(n) + self.head) % self.capacity
        slots = slots.to(next(iter(self.data.values())).device)
        for name, store in self.data.items():
            store[slots] = rows[name].to(store.dtype)
        self.head = (self.head + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self.added += n

    def sample(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """``n`` rows drawn uniformly with replacement (copies, safe to use outside a lock)."""
        idx = torch.randint(self.size, (n,), generator=generator)
        idx = idx.to(next(iter(self.data.values())).device)
        return {name: store[idx] for name, store in self.data.items()}

    def view(self) -> dict[str, Tensor]:
        """The filled rows (views: copy before releasing a lock)."""
        return {name: store[: self.size] for name, store in self.data.items()}

    def clear(self) -> None:
        """Forget every row (memory stays allocated)."""
        self.size = 0
        self.head = 0

    def state(self) -> dict[str, Tensor]:
        """Filled rows in storage order, for checkpoints."""
        return {name: t.clone() for name, t in self.view().items()}

    def load(self, rows: dict[str, Tensor], head: int, added: int) -> None:
        """Restore what :meth:`state` returned (with the saved write position)."""
        size = next(iter(rows.values())).shape[0] if rows else 0
        if size > self.capacity:
            raise ValueError(f"{size} saved rows do not fit a ring of {self.capacity}")
        for name, store in self.data.items():
            store[:size] = rows[name].to(store.device, store.dtype)
        self.size = size
        self.head = head % max(self.capacity, 1)
        self.added = added


#: Storage dtypes of features by their :class:`~earlyexit.distill.DistillConfig` name.
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def plan_capacities(
    rows: dict[str, tuple[int, int]], max_memory_bytes: int | None
) -> dict[str, int]:
    """Rows each ring may hold: ``rows`` maps a ring to (wanted rows, bytes per row); over
    ``max_memory_bytes`` in all, every ring shrinks by the same factor (a ring of 0 stays 0).

    Example:
        >>> plan_capacities({"a": (100, 8), "b": (100, 8)}, max_memory_bytes=800)
        {'a': 50, 'b': 50}
    """
    caps = {name: cap for name, (cap, _) in rows.items()}
    if max_memory_bytes is not None:
        total = sum(cap * size for cap, size in rows.values())
        if total > max_memory_bytes:  # shrink all, keeping their proportion
            scale = max_memory_bytes / total
            caps = {name: max(1, int(cap * scale)) if cap else 0 for name, cap in caps.items()}
    return caps


def ring_state(name: str, ring: TensorRing) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A ring as checkpoint tensors (``"{name}.{field}"``) and its JSON description.

    Example:
        >>> ring = TensorRing(4, {"z": ((2,), torch.float32)})
        >>> ring.add(z=torch.ones(3, 2))
        >>> tensors, meta = ring_state("replay", ring)
        >>> list(tensors), meta["head"], meta["fields"]
        (['replay.z'], 3, {'z': [[2], 'float32']})
    """
    tensors = {f"{name}.{field_name}": value for field_name, value in ring.state().items()}
    meta = {
        "capacity": ring.capacity,
        "head": ring.head,
        "added": ring.added,
        "fields": {
            k: [list(s), str(d).removeprefix("torch.")] for k, (s, d) in ring.fields.items()
        },
    }
    return tensors, meta


def ring_from_state(
    name: str, meta: dict[str, Any], tensors: dict[str, Tensor], device: torch.device
) -> TensorRing:
    """Rebuild the ring that :func:`ring_state` described."""
    fields = {
        k: (tuple(shape), getattr(torch, dtype)) for k, (shape, dtype) in meta["fields"].items()
    }
    ring = TensorRing(meta["capacity"], fields, device)
    ring.load({k: tensors[f"{name}.{k}"] for k in fields}, meta["head"], meta["added"])
    return ring


def ring_layout(
    config: DistillConfig, zs: Sequence[Tensor], num_classes: int, learned_gate: bool
) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, int]]:
    """The learner's rings for features ``zs`` (one batch per exit): the stored feature fields
    (``z{i}``, in ``storage_dtype``) and the rows of ``replay``, ``evidence`` and ``gate`` data,
    shrunk together to fit ``max_memory_bytes``.

    Example:
        >>> fields, caps = ring_layout(DistillConfig(), [torch.zeros(1, 8)], 10, True)
        >>> fields, caps["replay"]
        ({'z0': ((8,), torch.float32)}, 20000)
    """
    dtype = STORAGE_DTYPES[config.storage_dtype]
    itemsize = torch.tensor([], dtype=dtype).element_size()
    z_bytes = sum(z[0].numel() for z in zs) * itemsize
    num_exits, width = len(zs), len(AGREEMENT_FEATURES)
    caps = plan_capacities(
        {
            "replay": (config.replay_samples, z_bytes + num_classes * 4),
            "evidence": (config.evidence_samples, z_bytes + 8),
            "gate": (config.gate_samples if learned_gate else 0, num_exits * (width * 4 + 1)),
        },
        config.max_memory_bytes,
    )
    fields = {f"z{i}": (tuple(z.shape[1:]), dtype) for i, z in enumerate(zs)}
    return fields, caps
