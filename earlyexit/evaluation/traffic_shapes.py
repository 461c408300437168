"""Traffic that looks like production: class-skewed (Zipf) streams and streams whose mix shifts.

A labelled dataset (a reference workload's traffic or evaluation split) is re-ordered into a stream
whose classes follow a Zipf law over a seeded ranking of the classes: class of rank ``k`` (0-based)
is drawn with probability proportional to ``1 / (k + 1) ** exponent`` (``exponent=0``: uniform;
``1``: the classic Zipf; ``2``: the top class is ~60% of ten classes). A *shift* serves one ranking
up to a point and the reversed ranking after it, so the classes that dominated become the rarest.

Samples of a class are taken in a seeded order without replacement; only when a class runs out are
its samples reused (in a new order) and counted in :attr:`ShapedStream.repeats`, because a repeated
image is not new evidence.

Example:
    >>> labels = torch.arange(10).repeat(50)
    >>> stream = ShapedStream.zipf(labels, length=200, exponent=2.0, seed=0)
    >>> len(stream.indices), stream.repeats
    (200, 0)
    >>> int(class_shares(labels[stream.indices], 10).max() > 0.4)
    1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ShapedStream",
    "class_ranking",
    "class_shares",
    "dataset_labels",
    "zipf_weights",
]


def zipf_weights(num_classes: int, exponent: float) -> Tensor:
    """``[num_classes]`` float64 probabilities of ranks ``0..num_classes-1`` under Zipf.

    Example:
        >>> zipf_weights(3, 0.0).tolist()
        [0.3333333333333333, 0.3333333333333333, 0.3333333333333333]
        >>> [round(p, 3) for p in zipf_weights(3, 1.0).tolist()]
        [0.545, 0.273, 0.182]
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if not (isinstance(exponent, int | float) and 0.0 <= exponent < float("inf")):
        raise ValueError(f"exponent must be a finite number >= 0 (0: uniform), got {exponent!r}")
    ranks = torch.arange(1, num_classes + 1, dtype=torch.float64)
    weights = ranks.pow(-float(exponent))
    return weights / weights.sum()


def class_ranking(classes: Sequence[int], seed: int) -> list[int]:
    """A seeded order of ``classes``: who is most frequent under a skew.

    Example:
        >>> sorted(class_ranking([0, 1, 2, 3], seed=0))
        [0, 1, 2, 3]
    """
    order = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed + 17))
    return [int(classes[i]) for i in order]


def class_shares(labels: Tensor, num_classes: int) -> Tensor:
    """``[num_classes]`` share of each class among ``labels``."""
    counts = torch.bincount(labels.long().flatten(), minlength=num_classes).double()
    return counts / max(1, labels.numel())


def dataset_labels(dataset: Any) -> Tensor:
    """The labels of a labelled dataset, ``[N]`` int64: its ``labels`` attribute when it has one
    (the reference workloads do, without rendering), else read item by item.

    Raises:
        ValueError: the dataset's items are not ``(image, label)`` pairs.
    """
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, Tensor):
        return labels.long()
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise ValueError(
                "a shaped stream needs a labelled dataset whose items are (image, label); "
                f"item {i} is a {type(item).__name__}"
            )
        out.append(int(item[1]))
    return torch.tensor(out, dtype=torch.int64)


@dataclass
class ShapedStream:
    """Indices into a labelled dataset that make a class-skewed (and optionally shifting) stream.

    Attributes:
        indices: ``[length]`` int64 indices into the dataset, in serving order.
        rankings: the class ranking in force for each segment (one, or two for a shift).
        segment_starts: first stream position of each segment (``[0]`` or ``[0, shift_at]``).
        exponent: the Zipf exponent.
        repeats: positions that reuse a sample already served (its class had run out).
    """

    indices: Tensor
    rankings: list[list[int]]
    segment_starts: list[int]
    exponent: float
    repeats: int

    @classmethod
    def zipf(
        cls,
        labels: Tensor,
        length: int,
        exponent: float,
        seed: int,
        *,
        ranking: Sequence[int] | None = None,
    ) -> ShapedStream:
        """A stream of ``length`` samples whose classes follow Zipf(``exponent``) over
        ``ranking`` (default: a seeded ranking of the classes present in ``labels``)."""
        return cls.shifting(labels, length, exponent, seed, shift_at=None, ranking=ranking)

    @classmethod
    def shifting(
        cls,
        labels: Tensor,
        length: int,
        exponent: float,
        seed: int,
        *,
        shift_at: int | None,
        ranking: Sequence[int] | None = None,
    ) -> ShapedStream:
        """Zipf over ``ranking`` up to position ``shift_at``, over the reversed ranking after it
        (``None``: no shift). Within a class, samples come in a seeded order without replacement
        until the class runs out, then again in a new order (counted in ``repeats``).

        Example:
            >>> labels = torch.arange(4).repeat(100)
            >>> s = ShapedStream.shifting(labels, 200, 3.0, seed=1, shift_at=100)
            >>> first, second = labels[s.indices[:100]], labels[s.indices[100:]]
            >>> int(torch.bincount(first).argmax()) == s.rankings[0][0]
            True
            >>> int(torch.bincount(second, minlength=4).argmax()) == s.rankings[0][-1]
            True
        """
        labels = torch.as_tensor(labels).long().flatten()
        if labels.numel() == 0:
            raise ValueError("labels is empty: a shaped stream needs a labelled pool to draw from")
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be an integer >= 0, got {length!r}")
        present = sorted(int(c) for c in torch.unique(labels))
        order = class_ranking(present, seed) if ranking is None else [int(c) for c in ranking]
        if sorted(order) != present:
            raise ValueError(
                f"ranking must order exactly the classes present in labels {present}, got {order}"
            )
        if shift_at is not None and not (isinstance(shift_at, int) and 0 <= shift_at <= length):
            raise ValueError(f"shift_at must be an integer in [0, length={length}], got {shift_at}")
        weights = zipf_weights(len(order), exponent)
        rng = torch.Generator().manual_seed(seed)
        pools = {c: torch.nonzero(labels == c).flatten() for c in present}
        queues: dict[int, list[int]] = {c: [] for c in present}
        served: dict[int, int] = dict.fromkeys(present, 0)
        starts = [0] if shift_at is None or shift_at in (0, length) else [0, shift_at]
        rankings = [order] if len(starts) == 1 else [order, order[::-1]]
        if shift_at == 0 and length > 0:
            rankings = [order[::-1]]
        indices, repeats = [], 0
        for segment, start in enumerate(starts):
            end = starts[segment + 1] if segment + 1 < len(starts) else length
            ranks = torch.multinomial(weights, end - start, replacement=True, generator=rng)
            for rank in ranks.tolist():
                c = rankings[segment][rank]
                if not queues[c]:
                    perm = torch.randperm(len(pools[c]), generator=rng)
                    queues[c] = pools[c][perm].tolist()[::-1]  # pop() from the end
                if served[c] >= len(pools[c]):
                    repeats += 1
                served[c] += 1
                indices.append(queues[c].pop())
        return cls(
            indices=torch.tensor(indices, dtype=torch.int64),
            rankings=rankings,
            segment_starts=starts,
            exponent=float(exponent),
            repeats=repeats,
        )

    def subset(self, dataset: Any) -> torch.utils.data.Subset:
        """The stream as a dataset: ``dataset``'s items in serving order."""
        return torch.utils.data.Subset(dataset, self.indices.tolist())

    def describe(self, labels: Tensor, num_classes: int) -> dict[str, Any]:
        """Per segment: the ranking and the measured class shares (JSON-serialisable)."""
        out = []
        bounds = [*self.segment_starts, len(self.indices)]
        for k, ranking in enumerate(self.rankings):
            chunk = labels[self.indices[bounds[k] : bounds[k + 1]]]
            shares = class_shares(chunk, num_classes)
            out.append(
                {
                    "start": bounds[k],
                    "end": bounds[k + 1],
                    "ranking": ranking,
                    "top_class_share": float(shares.max()) if chunk.numel() else None,
                    "shares": [round(float(s), 4) for s in shares],
                }
            )
        return {"exponent": self.exponent, "repeats": self.repeats, "segments": out}
