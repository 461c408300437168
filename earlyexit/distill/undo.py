"""Undoing a learning step that failed: what it changed, kept so it can be put back.

A synchronous ``OnlineDistiller.step`` counts the batch, stores its rows, trains and may publish
new heads; if any of that raises, :class:`StepUndo` puts every part back as it was before the
call, so a failed call leaves no trace (the caller may retry the batch or drop it). It keeps:

* plain attributes of the parts (counters, lists, windows, random states), copied when the step
  begins;
* the rows of a ring that a write is about to overwrite, and its write position, taken just
  before the write (rings are large: only what a step touches is copied);
* the student and its optimizer state, copied once, before the step's first optimizer update.

Example:
    >>> import torch
    >>> from earlyexit.distill.buffers import TensorRing
    >>> ring = TensorRing(2, {"z": ((1,), torch.float32)})
    >>> ring.add(z=torch.tensor([[1.0], [2.0]]))
    >>> undo = StepUndo()
    >>> undo.ring_write(ring, 1)
    >>> ring.add(z=torch.tensor([[3.0]]))
    >>> undo.undo()
    >>> ring.view()["z"].flatten().tolist()
    [1.0, 2.0]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .buffers import TensorRing


def _copy(value: Any) -> Any:
    """A copy of ``value`` deep enough that in-place changes made by a step do not reach it.

    Lists and dicts are copied element by element (they hold counts, windows, reports); deques
    shallowly (their items are never changed in place); anything else is kept by reference (numbers,
    strings, tensors and rings are replaced, not changed, or are undone separately).
    """
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, deque):
        return deque(value, value.maxlen)
    return value


class StepUndo:
    """Restore actions collected during one step, run in reverse order by :meth:`undo`.

    Not thread-safe: the learner uses one per synchronous step, under its train lock.
    """

    def __init__(self) -> None:
        self._actions: list[Callable[[], None]] = []
        self._kept_modules: set[int] = set()

    def keep(self, restore: Callable[[], None]) -> None:
        """Run ``restore`` on :meth:`undo` (after every action kept later)."""
        self._actions.append(restore)

    def keep_attributes(self, obj: object, names: Iterable[str]) -> None:
        """Copy the attributes ``names`` of ``obj`` now; :meth:`undo` sets them back. A
        ``torch.Generator`` attribute keeps its state (the generator object stays the same)."""
        saved: dict[str, Any] = {}
        states: dict[str, torch.Tensor] = {}
        for name in names:
            value = getattr(obj, name)
            if isinstance(value, torch.Generator):
                states[name] = value.get_state()
            else:
                saved[name] = _copy(value)

        def restore() -> None:
            for name, value in saved.items():
                setattr(obj, name, value)
            for name, state in states.items():
                getattr(obj, name).set_state(state)

        self.keep(restore)

    def ring_write(self, ring: TensorRing | None, rows: int) -> None:
        """Before ``rows`` rows are added to ``ring``: keep its position and the filled rows the
        write will overwrite."""
        if ring is None or rows <= 0 or ring.capacity == 0:
            return
        size, head, added = ring.size, ring.head, ring.added
        n = min(rows, ring.capacity)
        saved: dict[str, torch.Tensor] = {}
        slots = None
        # Below capacity a ring fills slots [0, size) and writes at head == size: only a write
        # that wraps past the end reaches filled rows.
        if size == ring.capacity or head + n > ring.capacity:
            slots = (torch.arange(n) + head) % ring.capacity
            saved = {name: store[slots.to(store.device)] for name, store in ring.data.items()}

        def restore() -> None:
            if slots is not None:
                for name, store in ring.data.items():
                    store[slots.to(store.device)] = saved[name]
            ring.size, ring.head, ring.added = size, head, added

        self.keep(restore)

    def ring_clear(self, ring: TensorRing | None) -> None:
        """Before ``ring`` is cleared: keep its position (clearing leaves the rows in place)."""
        if ring is None:
            return
        size, head, added = ring.size, ring.head, ring.added

        def restore() -> None:
            ring.size, ring.head, ring.added = size, head, added

        self.keep(restore)

    def keep_module(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Before the first update of ``module`` by ``optimizer`` in this step: copy both (once)."""
        if id(module) in self._kept_modules:
            return
        self._kept_modules.add(id(module))
        weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        opt = optimizer.state_dict()
        opt_state = {
            pid: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            for pid, state in opt["state"].items()
        }
        groups = [dict(group) for group in opt["param_groups"]]

        def restore() -> None:
            module.load_state_dict(weights)
            optimizer.load_state_dict({"state": opt_state, "param_groups": groups})

        self.keep(restore)

    def undo(self) -> None:
        """Put back everything kept, latest first."""
        for restore in reversed(self._actions):
            restore()
        self._actions.clear()
