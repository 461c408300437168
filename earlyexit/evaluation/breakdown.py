"""Per-exit MAC table of a wrapped model: backbone up to each exit, each head, cumulative paths.

Two independent ways to fill it, so each checks the other:

* ``method="dispatch"`` re-counts with :class:`~earlyexit.costs.macs.MacCounter` (the counter
  the wrapper itself uses): one forward pass of the base model, reading the running total when
  each exit module finishes, plus each head on that exit's feature.
* ``method="fvcore"`` uses fvcore's per-module totals (:func:`~earlyexit.costs.macs.fvcore_macs`,
  with the published convention and the fused-attention handlers). fvcore gives totals per module,
  not per point in time, so each module's *own* MACs (its total minus its children's) are booked
  when the module finishes, in the order an eager pass finishes them; the backbone cost of exit
  ``i`` is everything booked up to the moment its module finishes.

Operators neither counter understood are listed in ``unsupported_ops`` (never silently zero).

Example:
    >>> table = mac_breakdown(eem)  # doctest: +SKIP
    >>> print(table.to_markdown())  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..costs.macs import MacCounter, fvcore_macs

__all__ = ["ExitCost", "MacBreakdown", "mac_breakdown"]


@dataclass(frozen=True)
class ExitCost:
    """One row of the MAC table (per sample, at the model's input size).

    Attributes:
        name: the exit module's name, or ``"final"`` for the base model's own classifier.
        backbone_macs: MACs of the backbone up to and including this module.
        head_macs: MACs of this exit's head (0 for ``"final"``).
        cumulative_macs: MACs of a sample that leaves here having had every head on the way
            evaluated (what ``ExitPoint.macs`` reports; for ``"final"``: base model + all heads).
        fraction: ``cumulative_macs / base_macs``.
    """

    name: str
    backbone_macs: int
    head_macs: int
    cumulative_macs: int
    fraction: float


@dataclass
class MacBreakdown:
    """Per-exit MAC table of a wrapped model.

    Attributes:
        rows: one :class:`ExitCost` per exit, then ``"final"``.
        base_macs: per-sample MACs of the unwrapped base model.
        head_overhead: all heads together as a share of ``base_macs`` (what a sample that runs to
            the end with every gate open pays on top of the base model).
        unsupported_ops: operator -> occurrences not counted and not known to be MAC-free.
        method: ``"dispatch"`` or ``"fvcore"``.
        input_size: ``(C, H, W)`` the table was counted at.
    """

    rows: list[ExitCost]
    base_macs: int
    head_overhead: float
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    method: str = "dispatch"
    input_size: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = asdict(self)
        out["input_size"] = list(self.input_size)
        return out

    def to_markdown(self) -> str:
        """A Markdown table (GMACs with 3 decimals, fractions in %).

        Example:
            >>> print(mac_breakdown(eem).to_markdown())  # doctest: +SKIP
            | exit | module | backbone GMACs | head MMACs | cumulative GMACs | of base |
        """
        lines = [
            "| exit | module | backbone GMACs | head MMACs | cumulative GMACs | of base |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for i, row in enumerate(self.rows):
            label = "final" if i == len(self.rows) - 1 else str(i)
            lines.append(
                f"| {label} | `{row.name}` | {row.backbone_macs / 1e9:.3f} | "
                f"{row.head_macs / 1e6:.3f} | {row.cumulative_macs / 1e9:.3f} | "
                f"{100 * row.fraction:.1f}% |"
            )
        lines.append("")
        lines.append(
            f"Base model: {self.base_macs / 1e9:.3f} GMACs per sample at {tuple(self.input_size)}; "
            f"all heads together: {100 * self.head_overhead:.2f}% of it (counted with {self.method})."
        )
        if self.unsupported_ops:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.unsupported_ops.items()))
            lines.append(f"Not counted (unsupported operators): {ops}.")
        return "\n".join(lines)


def _probe_input(eem: Any) -> Tensor:
    param = next(eem.base_model.parameters())
    return torch.zeros(1, *eem.input_size, device=param.device, dtype=param.dtype)


def _dispatch_counts(eem: Any) -> tuple[list[int], list[int], int, dict[str, int]]:
    """Backbone MACs at each exit, head MACs, base MACs and unsupported ops, by MacCounter."""
    model = eem.base_model
    names = [p.name for p in eem.exits]
    seen: dict[str, int] = {}
    feats: dict[str, Tensor] = {}
    counter = MacCounter()

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: object, output: object) -> None:
            seen.setdefault(name, counter.total)
            if isinstance(output, Tensor):
                feats.setdefault(name, output.detach())

        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad(), counter:
            model(_probe_input(eem))
    finally:
        for h in handles:
            h.remove()
    unsupported = dict(counter.unsupported_ops)
    base = counter.total
    heads = []
    for name, head in zip(names, eem.heads, strict=True):
        with torch.no_grad(), MacCounter() as hc:
            head(feats[name])
        heads.append(hc.total)
        for op, n in hc.unsupported_ops.items():
            unsupported[op] = unsupported.get(op, 0) + n
    return [seen[n] for n in names], heads, base, unsupported


def _fvcore_counts(eem: Any) -> tuple[list[int], list[int], int, dict[str, int]]:
    """The same figures from fvcore's per-module totals (see the module docstring)."""
    model = eem.base_model
    names = [p.name for p in eem.exits]
    x = _probe_input(eem)
    report = fvcore_macs(model, tuple(x.shape))
    by_module = report.by_module
    modules = dict(model.named_modules())
    # Own MACs of each module: its total minus what its direct children account for.
    own: dict[str, int] = {}
    for name, module in modules.items():
        total = by_module.get(name, 0)
        children = sum(
            by_module.get(f"{name}.{c}" if name else c, 0) for c, _ in module.named_children()
        )
        own[name] = max(total - children, 0)
    # Finishing order of every module in an eager pass; shared modules count once (fvcore does).
    order: list[str] = []
    feats: dict[str, Tensor] = {}
    handles = []
    for name, module in modules.items():

        def hook(m: nn.Module, a: object, o: object, name: str = name) -> None:
            if name not in order:
                order.append(name)
            if name in names and isinstance(o, Tensor):
                feats.setdefault(name, o.detach())

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    booked = 0
    at_exit: dict[str, int] = {}
    for name in order:
        booked += own.get(name, 0)
        if name in names:
            at_exit[name] = booked
    unsupported = dict(report.unsupported_ops)
    heads = []
    for name, head in zip(names, eem.heads, strict=True):
        head_report = fvcore_macs(head, tuple(feats[name].shape))
        heads.append(head_report.total)
        for op, n in head_report.unsupported_ops.items():
            unsupported[op] = unsupported.get(op, 0) + n
    return [at_exit[n] for n in names], heads, report.total, unsupported


def mac_breakdown(eem: Any, *, method: str = "dispatch") -> MacBreakdown:
    """Per-exit MAC table of a wrapped model, counted afresh at its input size.

    Args:
        eem: an :class:`~earlyexit.EarlyExitModel`.
        method: ``"dispatch"`` (fast, the counter the wrapper uses) or ``"fvcore"`` (fvcore's
            per-module totals with the published convention; slower: jit tracing).

    Returns:
        A :class:`MacBreakdown`; ``rows[i].cumulative_macs`` equals ``eem.exits[i].macs``.

    Example:
        >>> import timm, earlyexit as ee
        >>> eem = ee.wrap(timm.create_model("resnet18", num_classes=10).eval(), input_size=(3, 64, 64))
        >>> table = mac_breakdown(eem)
        >>> [r.name for r in table.rows][-1], table.rows[-1].backbone_macs == eem.base_macs
        ('final', True)
    """
    if method == "dispatch":
        backbone, heads, base, unsupported = _dispatch_counts(eem)
    elif method == "fvcore":
        backbone, heads, base, unsupported = _fvcore_counts(eem)
    else:
        raise ValueError(f"method must be 'dispatch' or 'fvcore', got {method!r}")
    rows, spent = [], 0
    for point, b, h in zip(eem.exits, backbone, heads, strict=True):
        spent += h
        rows.append(ExitCost(point.name, b, h, b + spent, (b + spent) / base))
    rows.append(ExitCost("final", base, 0, base + spent, (base + spent) / base))
    return MacBreakdown(
        rows=rows,
        base_macs=base,
        head_overhead=spent / base,
        unsupported_ops=unsupported,
        method=method,
        input_size=tuple(eem.input_size),
    )
