"""Training one exit head offline on recorded features: the loop the baselines and the data maps
share (the online learner trains from its replay buffer instead, step by step while serving).

A head's ``classify`` part (or the head itself, for a plain module) is fitted to targets on
features recorded with ``record_stream(keep_features=True)`` or ``eem.trace``: AdamW on shuffled
mini-batches, optionally with a cosine learning-rate schedule over the epochs. What it is fitted
to is the caller's ``loss`` (labels, a teacher's logits, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def head_logits(head: nn.Module, z: Tensor) -> Tensor:
    """A head's logits on its reduced input ``z``: ``head.classify(z)`` for exit heads, ``head(z)``
    for plain modules."""
    classify = getattr(head, "classify", None)
    return classify(z) if classify is not None else head(z)


def fit_head(
    head: nn.Module,
    z: Tensor,
    targets: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    weight_decay: float = 0.0,
    cosine_schedule: bool = False,
    after_epoch: Callable[[int], None] | None = None,
    progress: Callable[[range], object] | None = None,
) -> nn.Module:
    """Train ``head`` in place on ``(z, targets)`` and return it (in train mode).

    Each epoch draws one permutation from ``generator`` (so several heads trained one after the
    other on one generator see different, reproducible orders), and ``after_epoch(epoch)`` runs
    after it (e.g. to record training dynamics).

    Args:
        loss: ``loss(logits, targets[idx])`` of a mini-batch.
        progress: wraps the epoch range (e.g. a tqdm bar); default none.

    Example:
        >>> head = nn.Linear(4, 3)
        >>> z, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> g = torch.Generator().manual_seed(0)
        >>> _ = fit_head(head, z, y, nn.functional.cross_entropy, epochs=2, lr=1e-2,
        ...              batch_size=8, generator=g)
    """
    n = targets.shape[0]
    params = list(head.parameters())
    for p in params:
        p.requires_grad_(True)  # served heads may be frozen copies
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
        if cosine_schedule
        else None
    )
    epochs_range = range(epochs)
    for epoch in progress(epochs_range) if progress is not None else epochs_range:
        head.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            value = loss(head_logits(head, z[idx].float()), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
        if schedule is not None:
            schedule.step()
        if after_epoch is not None:
            after_epoch(epoch)
    return head


__all__ = ["fit_head", "head_logits"]
