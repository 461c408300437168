"""What one served batch brings to the learner, sorted before anything is stored.

:func:`sort_rows` turns a traced call into :class:`BatchRows`: samples per path and MACs spent,
the audited early answers' agreement with the full model, and for the samples that ran to the end
their features at every exit, the teacher's logits and whether each is evidence or teaches. It
changes nothing, so the learner stores a batch only once everything about it is known.

A sample whose teacher logits or stored features are not finite (a finite but extreme input can
overflow a model) is left out of all of it and counted in ``dropped``: one such row in replay
would make the student's weights NaN for good.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import InputError
from ..model import EarlyExitModel, ExitResult, ExitTrace
from .buffers import STORAGE_DTYPES
from .config import DistillConfig
from .traffic import spent_macs


class BatchRows(NamedTuple):
    """What one served batch brings to the learner (see :func:`sort_rows`)."""

    counts: list[int]  # samples per path (E + 1)
    spent: int  # MACs spent serving them, audits included
    audits: list[tuple[int, bool]]  # (exit, agreed with the full model) per usable audited row
    dropped: int  # rows that ran to the end with a non-finite teacher or features
    zs: list[Tensor] | None = None  # features at every exit of the rows that ran to the end
    teacher: Tensor | None = None  # their full-model logits
    evidence: Tensor | None = None  # which of them are evidence
    train: Tensor | None = None  # which of them teach
    classes: Tensor | None = None  # [num_classes] int64: served answers per class (mix monitor)


def finite_rows(values: Tensor, dtype: torch.dtype) -> Tensor:
    """``[N]`` bool: whether every entry of each row of ``values`` is finite once stored as
    ``dtype`` (a float32 feature beyond float16's range is Inf when stored in float16).

    Example:
        >>> finite_rows(torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [1e5, 0.0]]), torch.float16)
        tensor([ True, False, False])
    """
    stored = values if values.dtype == dtype else values.to(dtype)
    return torch.isfinite(stored).flatten(1).all(dim=1)


def sort_rows(
    eem: EarlyExitModel,
    config: DistillConfig,
    result: ExitResult,
    trace: ExitTrace,
    audit: Tensor,
    calibration_side: Tensor,
) -> BatchRows:
    """Sort a batch served by ``eem.trace(x, audit=audit)``: ``calibration_side`` marks the
    samples whose content is held out (evidence), the others may teach.

    Example:
        >>> result, trace = eem.trace(x, audit=audit, input_checked=True)  # doctest: +SKIP
        >>> rows = sort_rows(eem, config, result, trace, audit, held_out)  # doctest: +SKIP
        >>> rows.counts, rows.dropped  # doctest: +SKIP
    """
    num_exits = eem.num_exits
    batch = result.exit_index.shape[0]
    exit_index = result.exit_index.cpu()
    path = eem.path_macs()
    final_rows = trace.final_rows
    counts = torch.bincount(exit_index, minlength=num_exits + 1).tolist()
    answers = result.logits.argmax(dim=-1).cpu() if batch else torch.zeros(0, dtype=torch.long)
    classes = torch.bincount(answers, minlength=result.logits.shape[-1])
    audited_full = audit.cpu() & (exit_index < num_exits)
    spent = spent_macs(exit_index, audited_full, path, num_exits)
    if final_rows.numel() == 0 or trace.final_logits is None:
        return BatchRows(counts, spent, [], 0, classes=classes)
    teacher = trace.final_logits.detach()
    # Features of every exit for the samples that ran to the end.
    zs: list[Tensor] | None = []
    for record in trace.exits:
        if record is None:  # cannot happen with trace(); guard for custom models
            zs = None
            break
        pos = torch.full((batch,), -1, dtype=torch.long, device=record.rows.device)
        pos[record.rows] = torch.arange(record.rows.numel(), device=record.rows.device)
        zs.append(record.z[pos[final_rows]].detach())
    # Replay keeps teacher logits in float32 and features in the storage dtype: check them so.
    usable = finite_rows(teacher, torch.float32)
    storage = STORAGE_DTYPES[config.storage_dtype]
    for z in zs or []:
        usable = usable & finite_rows(z, storage)
    dropped = int((~usable).sum())
    position = torch.full((batch,), -1, dtype=torch.long, device=final_rows.device)
    position[final_rows] = torch.arange(final_rows.numel(), device=final_rows.device)
    # Agreement of audited early answers with the full model: the drift monitor's input (held-out
    # contents only; training-side samples drawn to teach ran to the end too, and paid for it).
    audited_early = audited_full & calibration_side.cpu()
    audited_rows = torch.nonzero(audited_early.to(final_rows.device)).flatten()
    audits: list[tuple[int, bool]] = []
    if audited_rows.numel():
        if dropped:
            audited_rows = audited_rows[usable[position[audited_rows]]]
        early = result.logits[audited_rows].argmax(dim=-1)
        full = teacher[position[audited_rows]].argmax(dim=-1)
        agree = (early == full).cpu()
        where = exit_index[audited_rows.cpu()]
        audits = list(zip(where.tolist(), agree.tolist(), strict=True))
    if zs is None:
        return BatchRows(counts, spent, audits, dropped, classes=classes)
    held_out = calibration_side[final_rows]
    evidence = audit[final_rows] & held_out
    train = ~held_out
    if config.replay_after_open == "sampled":
        # Only rows drawn to run to the end teach (all of them while every gate is closed): with
        # a gate open the others are the ones no head could answer, a sample of the hardest.
        train = train & audit[final_rows]
    if dropped:
        evidence, train = evidence & usable, train & usable
    return BatchRows(counts, spent, audits, dropped, zs, teacher, evidence, train, classes)


def check_rows(rows: object, num_exits: int, num_classes: int) -> None:
    """Refuse a :class:`BatchRows` that a learner of ``num_exits`` exits and ``num_classes``
    classes cannot store (it came from another model, or was built by hand), before anything
    changes.

    Raises:
        InputError: saying which part is wrong and what was expected.

    Example:
        >>> check_rows(BatchRows([3, 0, 1], 10, [], 0), num_exits=2, num_classes=10)
        >>> check_rows(BatchRows([3, 1], 10, [], 0), num_exits=2, num_classes=10)
        Traceback (most recent call last):
        earlyexit.errors.InputError: rows.counts has 2 entries; a model with 2 exits expects 3 (one per exit, then the full model)
    """
    if not isinstance(rows, BatchRows):
        raise InputError(
            f"expected the BatchRows a ServingReplica returned, got {type(rows).__name__}"
        )
    if len(rows.counts) != num_exits + 1 or any(int(c) < 0 for c in rows.counts):
        raise InputError(
            f"rows.counts has {len(rows.counts)} entries; a model with {num_exits} exits expects "
            f"{num_exits + 1} (one per exit, then the full model)"
        )
    if any(not 0 <= int(e) < num_exits for e, _ in rows.audits):
        raise InputError(f"rows.audits names an exit outside 0..{num_exits - 1}")
    classes = rows.classes
    if classes is not None and (
        not isinstance(classes, Tensor)
        or classes.dtype != torch.int64
        or tuple(classes.shape) != (num_classes,)
        or bool((classes < 0).any())
    ):
        raise InputError(
            f"rows.classes must be a [{num_classes}] int64 tensor of served answers per class "
            "(or None)"
        )
    if rows.zs is None:
        return
    n = None if rows.teacher is None else rows.teacher.shape[0]
    if rows.teacher is None or rows.teacher.dim() != 2 or rows.teacher.shape[1] != num_classes:
        shape = None if rows.teacher is None else tuple(rows.teacher.shape)
        raise InputError(f"rows.teacher must be [N, {num_classes}] logits, got {shape}")
    if len(rows.zs) != num_exits or any(z.shape[0] != n for z in rows.zs):
        raise InputError(
            f"rows.zs must hold {num_exits} feature tensors of {n} rows each (one per exit)"
        )
    for name in ("evidence", "train"):
        mask = getattr(rows, name)
        if mask is None or mask.dtype != torch.bool or tuple(mask.shape) != (n,):
            raise InputError(f"rows.{name} must be a [{n}] bool mask")
