"""Record a stream once: what every head and the full model said about every sample.

Serving a stream with every head evaluated on every sample (``eem.trace`` with every sample
audited, so nothing leaves and nothing is skipped) gives, per sample, each head's gate score and
argmax and the full model's answer. What any threshold policy would have done is then a pure
function of that record (:mod:`earlyexit.evaluation.policies`), so a sweep of hundreds of
thresholds costs one pass of the backbone.

Example:
    >>> rec = record_stream(eem, images, labels=labels)  # doctest: +SKIP
    >>> rec.scores.shape  # [N, E] gate scores  # doctest: +SKIP
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..gates import Gate, GateContext
from ..routing import exit_path_macs, gates_open, heads_evaluated

__all__ = ["StreamRecord", "iterate_batches", "record_stream"]


# ------------------------------------------------------------------------------------ batches


def iterate_batches(
    data: Any, labels: Tensor | None = None, batch_size: int = 64
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(x, y)`` batches from a tensor, a ``Dataset`` of samples, or an iterable of batches.

    ``data`` may be a ``[N, C, H, W]`` tensor (with optional ``labels`` ``[N]``), a
    ``torch.utils.data.Dataset`` whose items are an image or ``(image, label)``, or any iterable
    (e.g. a ``DataLoader``) of batches ``x`` or ``(x, y)``. ``y`` is ``None`` when there are no labels.

    Example:
        >>> [tuple(x.shape) for x, _ in iterate_batches(torch.zeros(5, 3, 8, 8), batch_size=2)]
        [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(data, Tensor):
        if labels is not None and labels.shape[0] != data.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {data.shape[0]} samples")
        for start in range(0, data.shape[0], batch_size):
            y = None if labels is None else labels[start : start + batch_size]
            yield data[start : start + batch_size], y
        return
    if labels is not None:
        raise ValueError("labels= is only for a tensor of images; datasets carry their own labels")
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    for item in data:
        if isinstance(item, Tensor):
            yield item, None
        elif isinstance(item, (tuple, list)) and len(item) >= 2:
            y = item[1]
            yield item[0], (torch.as_tensor(y) if y is not None else None)
        else:
            raise TypeError(
                f"expected batches x or (x, y), got {type(item).__name__}; wrap single images "
                "in a DataLoader"
            )


# ------------------------------------------------------------------------------------ record


@dataclass
class StreamRecord:
    """What every head and the full model said about every sample of a stream.

    Attributes:
        scores: ``[N, E]`` gate scores of each exit's head (the quantity thresholds compare with).
        max_prob: ``[N, E]`` largest softmax probability of each head (for max-softmax baselines).
        preds: ``[N, E]`` argmax of each head.
        final_pred: ``[N]`` argmax of the full model.
        labels: ``[N]`` ground truth, or ``None`` for an unlabelled stream.
        backbone_macs: per exit, per-sample MACs of the backbone up to it.
        head_macs: per exit, per-sample MACs of its head.
        base_macs: per-sample MACs of the base model.
        needs_history: whether the gate looks at earlier heads (then every earlier head is
            evaluated whenever a later gate is open; see :meth:`path_macs`), or per exit whether
            it reads that exit's head (:meth:`~earlyexit.gates.Gate.history_sources`).
        exit_names: module name of each exit.
        served_exit: ``[N]`` the exit the wrapper chose with the thresholds it had while recording.
        recorded_thresholds: those thresholds.
        features: per exit ``[N, ...]`` reduced head inputs (``head.reduce``), when kept, so other
            heads can be scored on the same stream (:meth:`with_heads`).
        final_logits: ``[N, K]`` the full model's logits, when features are kept (teacher signal).
    """

    scores: Tensor
    max_prob: Tensor
    preds: Tensor
    final_pred: Tensor
    labels: Tensor | None
    backbone_macs: tuple[int, ...]
    head_macs: tuple[int, ...]
    base_macs: int
    needs_history: bool | tuple[bool, ...] = False
    exit_names: tuple[str, ...] = ()
    served_exit: Tensor | None = None
    recorded_thresholds: tuple[float, ...] | None = None
    features: list[Tensor] | None = field(default=None, repr=False)
    final_logits: Tensor | None = field(default=None, repr=False)

    @property
    def num_samples(self) -> int:
        """Number of samples in the stream."""
        return int(self.final_pred.shape[0])

    @property
    def num_exits(self) -> int:
        """Number of early exits."""
        return len(self.backbone_macs)

    def path_macs(self, thresholds: Sequence[float] | None = None) -> tuple[int, ...]:
        """Per-sample MACs of each path (``E`` exits, then the full model) under ``thresholds``.

        Same accounting as :meth:`EarlyExitModel.path_macs`: the heads of closed exits are skipped,
        unless the gate needs history and a later gate is open. ``None`` = every head evaluated.

        Example:
            >>> rec.path_macs([math.inf] * rec.num_exits)[-1] == rec.base_macs  # doctest: +SKIP
            True
        """
        e = self.num_exits
        if thresholds is None:
            evaluated: tuple[bool, ...] = (True,) * e
        else:
            if len(thresholds) != e:
                raise ValueError(f"expected {e} thresholds, got {len(thresholds)}")
            evaluated = heads_evaluated(gates_open(thresholds), self.needs_history)
        return exit_path_macs(self.backbone_macs, self.head_macs, self.base_macs, evaluated)

    def subset(self, index: Tensor | slice) -> StreamRecord:
        """The record of some samples only (e.g. a calibration / evaluation split)."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return replace(
            self,
            scores=self.scores[index],
            max_prob=self.max_prob[index],
            preds=self.preds[index],
            final_pred=self.final_pred[index],
            labels=pick(self.labels),
            served_exit=pick(self.served_exit),
            features=None if self.features is None else [f[index] for f in self.features],
            final_logits=pick(self.final_logits),
        )

    @torch.no_grad()
    def with_heads(
        self, heads: Sequence[nn.Module], gate: Gate, *, batch_size: int = 1024
    ) -> StreamRecord:
        """The same stream scored by other heads (same backbone, same exits, same head costs).

        Needs the reduced features (``record_stream(..., keep_features=True)``); each head's
        ``classify`` (or ``forward`` for plain modules) is applied to them.

        Example:
            >>> sdn = rec.with_heads(trained_heads, eem.gate)  # doctest: +SKIP
        """
        if self.features is None:
            raise ValueError("this record has no features: record it with keep_features=True")
        if len(heads) != self.num_exits:
            raise ValueError(f"expected {self.num_exits} heads, got {len(heads)}")
        scores, max_prob, preds = [], [], []
        for start in range(0, self.num_samples, batch_size):
            rows = torch.arange(start, min(start + batch_size, self.num_samples))
            history: list[Tensor | None] = []
            s_b, m_b, p_b = [], [], []
            for i, head in enumerate(heads):
                z = self.features[i][start : start + batch_size]
                classify = getattr(head, "classify", head)
                logits = classify(z).float()
                ctx = GateContext(i, rows, list(history) if gate.needs_history else [])
                s_b.append(gate.score(logits, ctx).float())
                m_b.append(logits.softmax(-1).amax(-1))
                p_b.append(logits.argmax(-1))
                history.append(logits)
            scores.append(torch.stack(s_b, 1))
            max_prob.append(torch.stack(m_b, 1))
            preds.append(torch.stack(p_b, 1))
        return replace(
            self,
            scores=torch.cat(scores),
            max_prob=torch.cat(max_prob),
            preds=torch.cat(preds),
            needs_history=gate.history_sources(self.num_exits),
            served_exit=None,
            recorded_thresholds=None,
        )


def record_stream(
    eem: Any,
    data: Any,
    *,
    labels: Tensor | None = None,
    batch_size: int = 64,
    keep_features: bool = False,
    progress: bool = False,
    desc: str = "recording stream",
) -> StreamRecord:
    """Serve ``data`` through ``eem`` once, evaluating every head on every sample, and record it.

    Every sample is *audited* (runs to the end even if a gate lets it out), so the record holds
    each head's score and argmax and the full model's answer for all samples, whatever the
    thresholds; ``served_exit`` still says where the wrapper would have answered each one. The
    wrapper's thresholds, heads and base model are not changed.

    Args:
        eem: an :class:`~earlyexit.EarlyExitModel`.
        data: see :func:`iterate_batches` (a tensor, a dataset, or batches ``x`` / ``(x, y)``).
        labels: labels for a tensor ``data``.
        batch_size: batch size for tensors and datasets.
        keep_features: also keep each head's reduced input and the final logits (needed to score
            other heads with :meth:`StreamRecord.with_heads` or to train heads offline).
        progress: show a tqdm progress bar (on stderr).

    Example:
        >>> rec = record_stream(eem, torch.randn(16, 3, 64, 64))  # doctest: +SKIP
        >>> rec.scores.shape  # doctest: +SKIP
        torch.Size([16, 4])
    """
    from tqdm.auto import tqdm

    e = eem.num_exits
    parts: dict[str, list[Tensor]] = {
        k: [] for k in ("scores", "max_prob", "preds", "final", "labels", "served", "logits")
    }
    feats: list[list[Tensor]] = [[] for _ in range(e)]
    any_labels, all_labels = False, True
    total = None
    if isinstance(data, Tensor):
        total = data.shape[0]
    elif hasattr(data, "__len__") and isinstance(data, torch.utils.data.Dataset):
        total = len(data)
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, file=sys.stderr)
    try:
        for x, y in iterate_batches(data, labels, batch_size):
            n = x.shape[0]
            if n == 0:
                continue
            audit = torch.ones(n, dtype=torch.bool, device=x.device)
            result, trace = eem.trace(x, audit=audit)
            if trace.final_logits is None or trace.final_rows.shape[0] != n:
                raise RuntimeError("every audited sample should have run to the end")
            order = torch.argsort(trace.final_rows)
            final = trace.final_logits[order].float()
            s_b, m_b, p_b = [], [], []
            for i, rec in enumerate(trace.exits):
                if rec is None or rec.rows.shape[0] != n:
                    raise RuntimeError(f"exit {i} was not evaluated on every sample")
                o = torch.argsort(rec.rows)
                logits = rec.logits[o].float()
                s_b.append(rec.scores[o].float().cpu())
                m_b.append(logits.softmax(-1).amax(-1).cpu())
                p_b.append(logits.argmax(-1).cpu())
                if keep_features:
                    feats[i].append(rec.z[o].detach().float().cpu())
            parts["scores"].append(torch.stack(s_b, 1))
            parts["max_prob"].append(torch.stack(m_b, 1))
            parts["preds"].append(torch.stack(p_b, 1))
            parts["final"].append(final.argmax(-1).cpu())
            parts["served"].append(result.exit_index.cpu())
            if keep_features:
                parts["logits"].append(final.cpu())
            if y is None:
                all_labels = False
            else:
                any_labels = True
                parts["labels"].append(torch.as_tensor(y).long().cpu().reshape(-1))
            bar.update(n)
    finally:
        bar.close()
    if any_labels and not all_labels:
        raise ValueError("some batches have labels and some do not")
    if not parts["final"]:
        raise ValueError("the stream is empty")
    return StreamRecord(
        scores=torch.cat(parts["scores"]),
        max_prob=torch.cat(parts["max_prob"]),
        preds=torch.cat(parts["preds"]),
        final_pred=torch.cat(parts["final"]),
        labels=torch.cat(parts["labels"]) if any_labels else None,
        backbone_macs=tuple(eem.backbone_macs),
        head_macs=tuple(eem.head_macs),
        base_macs=int(eem.base_macs),
        needs_history=eem.gate.history_sources(eem.num_exits),
        exit_names=tuple(p.name for p in eem.exits),
        served_exit=torch.cat(parts["served"]),
        recorded_thresholds=tuple(eem.thresholds),
        features=[torch.cat(f) for f in feats] if keep_features else None,
        final_logits=torch.cat(parts["logits"]) if keep_features else None,
    )
