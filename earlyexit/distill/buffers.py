"""Fixed-capacity rings of per-sample rows: bounded memory however long the stream runs.

Also how the learner sizes its rings under one memory cap, and writes/reads them in checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import expect_dict, expect_int, expect_list, expect_str, expect_tensor, field_error
from ..errors import CheckpointError
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
#: Every dtype a saved ring field may name: an allow-list (a name from a file is looked up here,
#: never on ``torch``).
RING_DTYPES = {**STORAGE_DTYPES, "int64": torch.int64, "bool": torch.bool}
#: Most dimensions and elements of one field of one ring row (features are pooled: a few
#: thousand values; a file asking for more is not one of ours).
MAX_ROW_DIMS = 4
MAX_ROW_ELEMENTS = 2**24


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
        "fields": {k: [list(s), dtype_name(d)] for k, (s, d) in ring.fields.items()},
    }
    return tensors, meta


def dtype_name(dtype: torch.dtype) -> str:
    """How a ring field's dtype is written in a checkpoint (``"float32"``, ``"int64"``, ...)."""
    return str(dtype).removeprefix("torch.")


def saved_fields(meta: Any, name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The fields a saved ring describes (``meta["fields"]``: ``{field: [shape, dtype name]}``),
    checked: shapes of positive ints (at most ``MAX_ROW_DIMS`` dims, ``MAX_ROW_ELEMENTS``
    elements), dtype names from :data:`RING_DTYPES`.

    Example:
        >>> saved_fields({"fields": {"z0": [[8], "float32"]}}, "replay")
        {'z0': ((8,), torch.float32)}
    """
    where = f"rings.{name}.fields"
    fields = expect_dict(expect_dict(meta, f"rings.{name}", ("fields",))["fields"], where)
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for key, spec in fields.items():
        shape, dtype = expect_list(spec, f"{where}.{key}", 2)
        expect_list(shape, f"{where}.{key}[0]")
        if len(shape) > MAX_ROW_DIMS:
            raise field_error(f"{where}.{key}[0]", f"at most {MAX_ROW_DIMS} dimensions", shape)
        dims = tuple(expect_int(n, f"{where}.{key}[0]", 1, MAX_ROW_ELEMENTS) for n in shape)
        count = 1
        for n in dims:
            count *= n
        if count > MAX_ROW_ELEMENTS:
            raise field_error(f"{where}.{key}[0]", f"at most {MAX_ROW_ELEMENTS} elements", shape)
        out[key] = (dims, RING_DTYPES[expect_str(dtype, f"{where}.{key}[1]", tuple(RING_DTYPES))])
    return out


def feature_fields(
    meta: Any, name: str, num_exits: int, storage_dtype: str
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The feature fields ``z0 .. z{E-1}`` a saved ring must have: the row shapes it declares,
    in ``storage_dtype`` (checked further by :func:`check_ring_state`).

    Example:
        >>> feature_fields({"fields": {"z0": [[8], "float32"]}}, "replay", 1, "float32")
        {'z0': ((8,), torch.float32)}
    """
    saved = saved_fields(meta, name)
    dtype = STORAGE_DTYPES[storage_dtype]
    out = {}
    for i in range(num_exits):
        if f"z{i}" not in saved:
            raise CheckpointError(f"field 'rings.{name}.fields': feature field 'z{i}' is missing")
        out[f"z{i}"] = (saved[f"z{i}"][0], dtype)
    return out


def row_bytes(fields: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Bytes of one row of a ring with ``fields``.

    Example:
        >>> row_bytes({"z": ((4,), torch.float32), "teacher": ((), torch.int64)})
        24
    """
    total = 0
    for shape, dtype in fields.values():
        count = 1
        for n in shape:
            count *= n
        total += count * dtype.itemsize
    return total


def physical_memory() -> int:
    """Bytes of memory this machine has (1 TiB when the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 2**40


def check_ring_memory(config: DistillConfig, rings: Mapping[str, tuple[int, int]]) -> None:
    """Refuse saved rings (name -> (capacity, bytes per row)) that need more memory than the
    learner would allocate: more than ``max_memory_bytes`` in all (a ring keeps one row however
    small the cap), and never more than this machine has (the limit when there is no cap).

    Example:
        >>> check_ring_memory(DistillConfig(max_memory_bytes=100), {"replay": (10, 8)})
    """
    total = sum(capacity * size for capacity, size in rings.values())
    limit = physical_memory()
    if config.max_memory_bytes is not None:
        one_row_each = sum(size for _, size in rings.values())
        limit = min(limit, max(config.max_memory_bytes, one_row_each))
    if total > limit:
        sizes = ", ".join(f"{name} {cap} rows" for name, (cap, _) in rings.items())
        raise CheckpointError(
            f"field 'rings': the saved buffers ({sizes}) need {total} bytes, more than the "
            f"{limit} bytes allowed (max_memory_bytes={config.max_memory_bytes}, this machine "
            f"has {physical_memory()}); the file was edited or is not from this learner"
        )


def check_ring_state(
    name: str,
    meta: Any,
    tensors: Mapping[str, Tensor],
    fields: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    max_capacity: int,
) -> int:
    """Check a saved ring (:func:`ring_state`) against the ``fields`` it must have, before any
    memory is allocated for it: capacity in ``[1, max_capacity]``, write position and count
    consistent with the rows saved, each field's tensor of the declared dtype and row shape.
    Returns the capacity. Raises a :class:`~earlyexit.CheckpointError` naming the field.

    Example:
        >>> ring = TensorRing(4, {"z": ((2,), torch.float32)})
        >>> tensors, meta = ring_state("replay", ring)
        >>> check_ring_state("replay", meta, tensors, ring.fields, max_capacity=10)
        4
    """
    where = f"rings.{name}"
    expect_dict(meta, where, ("capacity", "head", "added", "fields"), ())
    saved = saved_fields(meta, name)
    if list(saved) != list(fields):
        raise field_error(f"{where}.fields", f"the fields {list(fields)}", list(saved))
    for key, (shape, dtype) in fields.items():
        if saved[key] != (tuple(shape), dtype):
            want = [list(shape), dtype_name(dtype)]
            raise field_error(f"{where}.fields.{key}", str(want), meta["fields"][key])
    capacity = expect_int(meta["capacity"], f"{where}.capacity", 1, max_capacity)
    sizes = set()
    for key, (shape, dtype) in fields.items():
        sizes.add(expect_tensor(tensors, f"{name}.{key}", (dtype,), (None, *shape)).shape[0])
    extra = sorted(
        k for k in tensors if k.startswith(f"{name}.") and k[len(name) + 1 :] not in fields
    )
    if extra:
        raise CheckpointError(f"tensors {extra[:5]} are not fields of ring {name!r}")
    if len(sizes) != 1:
        raise CheckpointError(
            f"ring {name!r}: its fields hold different row counts {sorted(sizes)}"
        )
    size = sizes.pop()
    if size > capacity:
        raise field_error(f"{where}.capacity", f"at least the {size} rows saved", capacity)
    head = expect_int(meta["head"], f"{where}.head", 0, capacity - 1)
    if size < capacity and head != size:  # a ring that never wrapped writes right after its rows
        raise field_error(f"{where}.head", f"{size} (the ring is not full)", head)
    expect_int(meta["added"], f"{where}.added", size)
    return capacity


def ring_from_state(
    name: str, meta: dict[str, Any], tensors: dict[str, Tensor], device: torch.device
) -> TensorRing:
    """Rebuild the ring that :func:`ring_state` described (check it first with
    :func:`check_ring_state`: this allocates ``capacity`` rows)."""
    fields = saved_fields(meta, name)
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
