"""How a served call runs inside the base model's forward pass: the exit hooks and the call's state.

Each exit module of the base model carries an :class:`ExitHook`. The hooks share a
:class:`HookRuntime` (thread-local): while the wrapper serves a call on this thread it holds that
call's :class:`ExitRun`, and the hook at exit ``i`` hands the module's output to
:meth:`ExitRun.at_exit`, which runs head ``i``, scores it with the gate, lets the rows that pass
leave (the rule of :mod:`earlyexit.routing`) and returns the feature of the remaining rows only.
When no row remains it raises :class:`StopForward`. Outside such a call, or on another thread,
the hooks return ``None`` and change nothing.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .gates import Gate, GateContext
from .heads import ExitHead
from .results import ExitPoint, ExitRecord
from .routing import leaves


class StopForward(Exception):
    """Raised by an exit hook when every sample of the batch has left: ends the forward pass."""


class HookRuntime(threading.local):
    """The call being served on this thread, if any. Hooks hold this, never the wrapper itself,
    so the wrapper can be garbage collected (and its hooks removed) while the model lives on."""

    run: ExitRun | None = None


class ExitRun:
    """State of one served call: which caller rows are still running and what was answered."""

    def __init__(
        self,
        batch: int,
        device: torch.device,
        heads: tuple[ExitHead, ...],
        thresholds: tuple[float, ...],
        gate: Gate,
        evaluate: tuple[bool, ...],
        capture: bool,
        audit: Tensor | None,
    ) -> None:
        self.rows = torch.arange(batch, device=device)
        self.decided = torch.zeros(batch, dtype=torch.bool, device=device)
        self.heads = heads
        self.thresholds = thresholds
        self.gate = gate
        self.evaluate = evaluate
        self.capture = capture
        self.audit = audit
        self.history: list[Tensor | None] = []
        self.answers: list[tuple[Tensor, Tensor, int, Tensor]] = []
        self.records: list[ExitRecord | None] = [None] * len(heads)

    def at_exit(self, i: int, feature: object) -> Tensor | None:
        if not self.evaluate[i]:
            self.history.append(None)
            return None
        if not isinstance(feature, Tensor) or feature.shape[0] != self.rows.shape[0]:
            raise RuntimeError(
                f"exit {i} expected a tensor with {self.rows.shape[0]} rows, got "
                f"{type(feature).__name__} {getattr(feature, 'shape', '')}: this module is not a "
                "stage boundary of the model"
            )
        head = self.heads[i]
        z = head.reduce(feature)
        logits = head.classify(z)
        threshold = self.thresholds[i]
        if threshold == math.inf and not self.capture:
            # A closed gate's head runs only as history for a later gate: no score needed.
            self.history.append(logits)
            return None
        scores = self.gate.checked_score(logits, GateContext(i, self.rows, self.history))
        self.history.append(logits)
        if self.capture:
            self.records[i] = ExitRecord(self.rows, z, logits, scores)
        if threshold == math.inf:
            return None
        remaining = self.rows.shape[0]
        if self.audit is None:
            # Serving without audits: a row that passes leaves at once, so no remaining row was
            # decided before and one count is all there is (fewer small ops at batch 1).
            passed = leaving = leaves(scores, threshold)
            if remaining == 1:
                # One row: it leaves or stays whole, so one host sync and no index arithmetic.
                if not bool(passed):
                    return None
                self.answers.append((self.rows, logits, i, scores))
                raise StopForward
            num_passed = num_leaving = int(passed.sum())
        else:
            passed = leaves(scores, threshold) & ~self.decided
            leaving = passed & ~self.audit[self.rows]
            # One host sync per exit (on a GPU each sync stalls the launch queue): both counts at
            # once, then indices of known size, so no boolean mask below needs another.
            num_passed, num_leaving = torch.stack((passed.sum(), leaving.sum())).tolist()
        if num_passed == 0:
            return None
        if num_leaving == remaining:
            # Every row leaves (so every row passed and none was decided before): answer the
            # whole batch as it is, no gather of rows.
            self.answers.append((self.rows, logits, i, scores))
            raise StopForward
        passed_rows = indices_of(passed, num_passed)
        self.answers.append((self.rows[passed_rows], logits[passed_rows], i, scores[passed_rows]))
        self.decided = self.decided | passed
        if num_leaving == 0:
            return None
        remaining -= num_leaving
        keep = indices_of(~leaving, remaining)
        self.rows = self.rows[keep]
        self.decided = self.decided[keep]
        self.history = [h[keep] if h is not None else None for h in self.history]
        return feature[keep]


_STATIC_NONZERO: dict[str, bool] = {}  # device type -> whether torch.nonzero_static works there


def indices_of(mask: Tensor, count: int) -> Tensor:
    """Positions of the ``count`` True entries of ``mask``. With the count known, nonzero_static
    finds them without another host sync (a boolean-mask index would sync to learn the size);
    where a torch version or backend lacks it, the plain (syncing) nonzero gives the same."""
    kind = mask.device.type
    if _STATIC_NONZERO.get(kind, True):
        try:
            return torch.nonzero_static(mask, size=count).squeeze(1)
        except (AttributeError, NotImplementedError, RuntimeError):
            _STATIC_NONZERO[kind] = False
    return torch.nonzero(mask).squeeze(1)


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` has no NaN/Inf. A NaN or Inf anywhere makes the sum non-finite, so a finite
    sum (one cheap reduction, no bool tensor of the input's size) settles it; only a non-finite
    sum (a real NaN/Inf, or a float overflow of huge values) pays the exact elementwise check."""
    total = x.sum(dtype=torch.float32) if x.element_size() < 4 else x.sum()
    if bool(torch.isfinite(total)):
        return True
    return bool(torch.isfinite(x).all())


class ExitHook:
    """The forward hook at exit ``index``: hands the module's output to the call being served.

    A class rather than a closure so that a base model carrying it can be copied or pickled. A
    copy carries no runtime (a thread-local cannot be copied, and must not be shared: the copy
    would serve the original's calls), so it is inert, and :func:`strip_copied_hooks` removes it
    when a wrapper is rebuilt on the copied model.
    """

    __slots__ = ("index", "runtime")

    def __init__(self, runtime: HookRuntime | None, index: int) -> None:
        self.runtime = runtime
        self.index = index

    def __call__(self, module: nn.Module, args: object, output: object) -> Tensor | None:
        runtime = self.runtime
        run = None if runtime is None else runtime.run
        if run is None:  # not our call, another thread, or a copied hook: stay inert
            return None
        return run.at_exit(self.index, output)

    def __reduce__(self) -> tuple[type, tuple[None, int]]:
        return (ExitHook, (None, self.index))


def strip_copied_hooks(model: nn.Module) -> None:
    """Remove the inert exit hooks a copied or unpickled base model carries over from the wrappers
    of the original model, so that a wrapper rebuilt on it runs only its own hooks."""
    for module in model.modules():
        stale = [key for key, hook in module._forward_hooks.items() if _is_copied_hook(hook)]
        for key in stale:
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)


def _is_copied_hook(hook: object) -> bool:
    return isinstance(hook, ExitHook) and hook.runtime is None


def register_hooks(
    model: nn.Module, exits: Sequence[ExitPoint], runtime: HookRuntime
) -> list[RemovableHandle]:
    return [
        model.get_submodule(point.name).register_forward_hook(ExitHook(runtime, i))
        for i, point in enumerate(exits)
    ]


def remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


__all__ = [
    "ExitHook",
    "ExitRun",
    "HookRuntime",
    "StopForward",
    "all_finite",
    "indices_of",
    "register_hooks",
    "remove_handles",
    "strip_copied_hooks",
]
