"""Scoring recorded traffic offline, exactly as serving would.

:func:`gate_scores` computes any gate's per-exit scores from a ``[N, E, K]`` stack of recorded head
logits (:func:`stack_trace_logits` builds one from a trace), passing each exit the earlier heads as
history the way the wrapper does when every head is evaluated. So trade-off curves of every gate
can be drawn from one recorded stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Gate, GateContext
from .registry import gate_names, make_gate


def gate_scores(
    gate: str | Gate | dict, head_logits: Tensor, final_logits: Tensor | None = None
) -> Tensor:
    """Per-exit scores of ``gate`` on a recorded stream, as serving would compute them.

    Args:
        gate: a gate name, config or object.
        head_logits: ``[N, E, K]`` logits of every exit head on ``N`` samples (e.g. stacked from
            ``eem.trace`` records with all gates closed; see :func:`stack_trace_logits`).
        final_logits: optional ``[N, K]`` logits of the full model; when given, the result has a
            last column with the gate's score of the full model's answer (what ``confidence`` says
            for samples that ran to the end).

    Returns:
        ``[N, E]`` (or ``[N, E + 1]``) float32 scores; column ``e`` sees heads ``0 .. e - 1`` as
        history, which is what the wrapper passes when every head is evaluated.

    Example:
        >>> stack = torch.tensor([[[2.0, 0.0], [3.0, 0.0], [0.0, 1.0]]])  # 1 sample, 3 exits
        >>> gate_scores("patience", stack).tolist()
        [[0.0, 1.0, 0.0]]
    """
    gate = make_gate(gate)
    if head_logits.dim() != 3:
        raise ConfigError(f"head_logits must be [N, E, K], got shape {tuple(head_logits.shape)}")
    n, num_exits, _ = head_logits.shape
    columns = [head_logits[:, e] for e in range(num_exits)]
    if final_logits is not None:
        if final_logits.shape != (n, head_logits.shape[2]):
            raise ConfigError(
                f"final_logits must be [{n}, {head_logits.shape[2]}], got {tuple(final_logits.shape)}"
            )
        columns.append(final_logits)
    rows = torch.arange(n, device=head_logits.device)
    out = [
        gate.score(logits, GateContext(e, rows, columns[:e])).float()
        for e, logits in enumerate(columns)
    ]
    return torch.stack(out, dim=1)


def all_gate_scores(
    head_logits: Tensor, gates: Sequence[str | Gate] | None = None
) -> dict[str, Tensor]:
    """``{gate name: [N, E] scores}`` for several gates (default: every registered gate).

    Example:
        >>> scores = all_gate_scores(torch.randn(5, 3, 4))
        >>> sorted(scores)[:3], scores["margin"].shape
        (['agreement', 'entropy', 'gini'], torch.Size([5, 3]))
    """
    chosen = list(gates) if gates is not None else list(gate_names())
    result: dict[str, Tensor] = {}
    for g in chosen:
        gate = make_gate(g)
        key = g if isinstance(g, str) else repr(gate)
        result[key] = gate_scores(gate, head_logits)
    return result


def stack_trace_logits(trace: object, batch: int) -> Tensor:
    """``[N, E, K]`` head logits from an :class:`~earlyexit.model.ExitTrace`, in caller row order.

    The trace must have every head evaluated on every row (serve with all gates closed, or audit
    every sample), else a row would be missing and this raises.

    Example:
        >>> res, trace = eem.trace(x)  # doctest: +SKIP
        >>> stack = stack_trace_logits(trace, x.shape[0])  # doctest: +SKIP
    """
    parts = []
    for e, record in enumerate(trace.exits):  # type: ignore[attr-defined]
        if record is None or record.rows.numel() != batch:
            raise ConfigError(
                f"exit {e} was not evaluated on all {batch} rows; trace with all gates closed "
                "(or audit=torch.ones(B, dtype=torch.bool)) to record a full stack"
            )
        out = torch.empty_like(record.logits)
        out[record.rows] = record.logits
        parts.append(out)
    return torch.stack(parts, dim=1)


__all__ = ["all_gate_scores", "gate_scores", "stack_trace_logits"]
