"""Data cartography of live traffic: which samples the exit heads find easy, ambiguous or hard.

Data maps (Swayamdipta et al., used for offloading by DIMEC-DC) describe each sample by its
training dynamics: across successive checkpoints of a model being trained, the probability it gives
to the sample's target class; its **confidence** is the mean of those probabilities and its
**variability** their standard deviation. Easy samples are learnt early and stay learnt (high
confidence, low variability), hard ones are never learnt (low confidence, low variability), and
ambiguous ones flip (high variability).

Here the "model being trained" is each exit head, the "target class" is the full model's
prediction (the teacher of self-distillation; no labels needed), and a checkpoint is a point where
the heads have been updated. :class:`CartographyMeter` accumulates the statistics in the
torchmetrics style (``update``/``compute``/``reset``) so the online distiller can feed it as it
trains; :func:`train_heads_offline` is a standalone driver that trains heads for a few epochs on a
recorded stream (features ``z`` from ``eem.trace``, KL to the final logits) and feeds a meter.

Use as the seed uses it: samples that are hard for the shallow heads will not leave there, so
sending them straight to the deep end (:class:`DifficultyRouter`, a cheap probe of whether a
sample is hard) saves the heads (or the intermediate sites) they would have paid for in vain. Map
regions of *new* samples are unknown, so the router predicts them from an early feature; whether
this pays is an empirical question the benchmark answers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._optional import import_demo_package
from .distill.offline import fit_head, head_logits
from .errors import ConfigError

EASY, AMBIGUOUS, HARD = 0, 1, 2
REGION_NAMES = ("easy", "ambiguous", "hard")


@dataclass
class DataMap:
    """Training dynamics of each sample, per exit.

    Attributes:
        ids: ``[N]`` int64 sample ids (sorted).
        confidence: ``[N, E]`` mean teacher-class probability over checkpoints.
        variability: ``[N, E]`` its standard deviation (population, as in data maps).
        correctness: ``[N, E]`` share of checkpoints whose argmax was the teacher's (``nan`` if
            never reported).
        count: ``[N, E]`` checkpoints observed.
    """

    ids: Tensor
    confidence: Tensor
    variability: Tensor
    correctness: Tensor
    count: Tensor

    def summary(self, exit: int | None = None) -> tuple[Tensor, Tensor]:
        """``(confidence [N], variability [N])`` of one exit, or averaged over exits (``None``)."""
        if exit is None:
            return self.confidence.nanmean(dim=1), self.variability.nanmean(dim=1)
        return self.confidence[:, exit], self.variability[:, exit]

    def regions(
        self,
        exit: int | None = None,
        *,
        confidence_threshold: float = 0.5,
        ambiguous_quantile: float = 0.75,
    ) -> Tensor:
        """``[N]`` region of each sample: 0 easy, 1 ambiguous, 2 hard (see :func:`classify_regions`)."""
        conf, var = self.summary(exit)
        return classify_regions(conf, var, confidence_threshold, ambiguous_quantile)


def classify_regions(
    confidence: Tensor,
    variability: Tensor,
    confidence_threshold: float = 0.5,
    ambiguous_quantile: float = 0.75,
) -> Tensor:
    """Easy (0) / ambiguous (1) / hard (2) from confidence and variability.

    Ambiguous: variability in the top ``1 - ambiguous_quantile`` share (relative, because how much
    a probability moves depends on how long and how fast the heads train). Of the rest, easy when
    the mean teacher-class probability reaches ``confidence_threshold``, hard below it.

    Example:
        >>> conf = torch.tensor([0.9, 0.1, 0.5, 0.8])
        >>> var = torch.tensor([0.01, 0.02, 0.30, 0.03])
        >>> classify_regions(conf, var).tolist()
        [0, 2, 1, 0]
    """
    if confidence.shape != variability.shape or confidence.dim() != 1:
        raise ConfigError("confidence and variability must both be [N]")
    if not 0.0 <= ambiguous_quantile <= 1.0:
        raise ConfigError(f"ambiguous_quantile must be in [0, 1], got {ambiguous_quantile}")
    if confidence.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    cut = torch.quantile(variability.double(), ambiguous_quantile)
    out = torch.where(confidence >= confidence_threshold, EASY, HARD)
    if ambiguous_quantile < 1.0:
        out = torch.where(variability.double() > cut, AMBIGUOUS, out)
    return out.long()


class CartographyMeter:
    """Accumulates per-sample, per-exit teacher-class probabilities over checkpoints.

    Call :meth:`update` once per checkpoint (after each round of head updates) with the samples
    evaluated there; samples may come and go. ``nan`` probabilities (head not evaluated) are skipped.
    Sums and sums of squares are kept in float64, so memory is ``O(samples x exits)``.

    Example:
        >>> meter = CartographyMeter(num_exits=1)
        >>> meter.update(torch.tensor([7, 3]), torch.tensor([[0.25], [0.75]]))
        >>> meter.update(torch.tensor([7, 3]), torch.tensor([[0.75], [0.75]]))
        >>> dm = meter.compute()
        >>> dm.ids.tolist(), dm.confidence.flatten().tolist(), dm.variability.flatten().tolist()
        ([3, 7], [0.75, 0.5], [0.0, 0.25])
        >>> dm.count.flatten().tolist()
        [2, 2]
    """

    def __init__(self, num_exits: int) -> None:
        if num_exits < 1:
            raise ConfigError(f"num_exits must be >= 1, got {num_exits}")
        self.num_exits = num_exits
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        self._index: dict[int, int] = {}
        self._count = torch.zeros(0, self.num_exits, dtype=torch.float64)
        self._sum = torch.zeros(0, self.num_exits, dtype=torch.float64)
        self._sumsq = torch.zeros(0, self.num_exits, dtype=torch.float64)
        self._correct = torch.zeros(0, self.num_exits, dtype=torch.float64)
        self._reported = torch.zeros(0, self.num_exits, dtype=torch.float64)

    def _rows(self, ids: Tensor) -> Tensor:
        new = [int(i) for i in ids.tolist() if int(i) not in self._index]
        for i in dict.fromkeys(new):
            self._index[i] = len(self._index)
        grow = len(self._index) - self._count.shape[0]
        if grow:
            pad = torch.zeros(grow, self.num_exits, dtype=torch.float64)
            self._count = torch.cat([self._count, pad])
            self._sum = torch.cat([self._sum, pad])
            self._sumsq = torch.cat([self._sumsq, pad])
            self._correct = torch.cat([self._correct, pad])
            self._reported = torch.cat([self._reported, pad])
        return torch.tensor([self._index[int(i)] for i in ids.tolist()], dtype=torch.long)

    def update(self, sample_ids: Tensor, probs: Tensor, correct: Tensor | None = None) -> None:
        """Record one checkpoint.

        Args:
            sample_ids: ``[B]`` integer ids (unique within the call).
            probs: ``[B, E]`` each exit head's probability of the teacher's class.
            correct: optional ``[B, E]`` bool, whether each head's argmax was the teacher's.
        """
        ids = torch.as_tensor(sample_ids).flatten().cpu()
        probs = probs.detach().double().cpu()
        if probs.shape != (ids.numel(), self.num_exits):
            raise ConfigError(
                f"probs must be [{ids.numel()}, {self.num_exits}], got {tuple(probs.shape)}"
            )
        if ids.unique().numel() != ids.numel():
            raise ConfigError("sample_ids repeat within one update; pass each sample once")
        rows = self._rows(ids)
        seen = ~torch.isnan(probs)
        p = torch.nan_to_num(probs)
        self._count[rows] += seen.double()
        self._sum[rows] += p
        self._sumsq[rows] += p * p
        if correct is not None:
            c = correct.detach().cpu().bool() & seen
            self._correct[rows] += c.double()
            self._reported[rows] += seen.double()

    def compute(self) -> DataMap:
        """The data map of every sample seen so far (``nan`` where an exit never saw a sample)."""
        order = sorted(self._index)
        rows = torch.tensor([self._index[i] for i in order], dtype=torch.long)
        count = self._count[rows]
        n = count.clamp_min(1)
        mean = self._sum[rows] / n
        var = (self._sumsq[rows] / n - mean * mean).clamp_min(0.0)
        nan = torch.full_like(mean, math.nan)
        reported = self._reported[rows]
        return DataMap(
            ids=torch.tensor(order, dtype=torch.long),
            confidence=torch.where(count > 0, mean, nan).float(),
            variability=torch.where(count > 0, var.sqrt(), nan).float(),
            correctness=torch.where(
                reported > 0, self._correct[rows] / reported.clamp_min(1), nan
            ).float(),
            count=count.long(),
        )


def train_heads_offline(
    z: Sequence[Tensor],
    teacher_logits: Tensor,
    heads: Sequence[nn.Module] | None = None,
    *,
    epochs: int = 8,
    lr: float = 3e-3,
    batch_size: int = 64,
    temperature: float = 1.0,
    sample_ids: Tensor | None = None,
    meter: CartographyMeter | None = None,
    seed: int = 0,
) -> tuple[list[nn.Module], DataMap]:
    """Train exit heads on recorded features by self-distillation and map the training dynamics.

    Args:
        z: per exit, ``[N, ...]`` head inputs (``ExitRecord.z`` from ``eem.trace``, in row order).
        teacher_logits: ``[N, K]`` the full model's logits (the teacher).
        heads: modules with ``classify(z)`` (e.g. ``eem.heads``; deep-copied, never modified) or
            plain ``z -> logits`` modules; default a LayerNorm + Linear per exit on flattened ``z``.
        epochs: checkpoints recorded (one after each epoch).
        sample_ids: ``[N]`` ids for the meter (default ``0..N-1``).
        meter: an existing meter to feed (default a new one).

    Returns:
        The trained heads and the data map.

    Example:
        >>> _, trace = eem.trace(x)  # doctest: +SKIP
        >>> heads, dm = train_heads_offline([r.z for r in trace.exits], trace.final_logits)  # doctest: +SKIP
    """
    num_exits = len(z)
    n, k = teacher_logits.shape
    if any(zi.shape[0] != n for zi in z):
        raise ConfigError("every z must have one row per teacher sample")
    generator = torch.Generator().manual_seed(seed)
    if heads is None:
        torch.manual_seed(seed)
        trained = [
            nn.Sequential(nn.Flatten(), nn.LayerNorm(zi[0].numel()), nn.Linear(zi[0].numel(), k))
            for zi in z
        ]
    else:
        if len(heads) != num_exits:
            raise ConfigError(f"got {len(heads)} heads for {num_exits} exits")
        trained = [copy.deepcopy(h).float() for h in heads]
    ids = torch.arange(n) if sample_ids is None else torch.as_tensor(sample_ids)
    meter = meter if meter is not None else CartographyMeter(num_exits)
    teacher = (teacher_logits.detach().float() / temperature).softmax(dim=-1)
    target = teacher_logits.argmax(dim=-1)
    feats = [zi.detach().float() for zi in z]

    def loss(logits: Tensor, soft_target: Tensor) -> Tensor:
        log_p = F.log_softmax(logits / temperature, dim=-1)
        return F.kl_div(log_p, soft_target, reduction="batchmean")

    # Each head is trained on its own; after every epoch its view of every sample (probability
    # of the teacher's class, and whether its argmax is that class) is a checkpoint of the map.
    probs = torch.zeros(epochs, n, num_exits)
    correct = torch.zeros(epochs, n, num_exits, dtype=torch.bool)
    for e, (head, f) in enumerate(zip(trained, feats, strict=True)):

        def checkpoint(epoch: int, head: nn.Module = head, f: Tensor = f, e: int = e) -> None:
            with torch.no_grad():
                head.eval()
                out = head_logits(head, f)
                probs[epoch, :, e] = out.softmax(-1).gather(1, target[:, None]).squeeze(1)
                correct[epoch, :, e] = out.argmax(-1) == target

        fit_head(
            head,
            f,
            teacher,
            loss,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            generator=generator,
            after_epoch=checkpoint,
        )
    for epoch in range(epochs):
        meter.update(ids, probs[epoch], correct[epoch])
    return trained, meter.compute()


class DifficultyRouter:
    """Predicts from an early feature whether a sample is hard (a logistic-regression probe).

    Trained on data-map regions of past traffic; at serving time, samples whose predicted
    probability of being hard reaches ``threshold`` skip the remaining heads and go to the deep
    end (or the far site) directly.

    Example:
        >>> router = DifficultyRouter().fit(z0, dm.regions() == HARD)  # doctest: +SKIP
        >>> skip = router.route(z0_new, threshold=0.8)  # doctest: +SKIP
    """

    def __init__(self, c: float = 1.0, max_iter: int = 500) -> None:
        self.c = c
        self.max_iter = max_iter
        self._model = None

    def fit(self, z: Tensor, hard: Tensor) -> DifficultyRouter:
        """Fit on ``[N, ...]`` features and ``[N]`` bool hard labels."""
        feature = "DifficultyRouter"
        LogisticRegression = import_demo_package("sklearn.linear_model", feature).LogisticRegression
        make_pipeline = import_demo_package("sklearn.pipeline", feature).make_pipeline
        StandardScaler = import_demo_package("sklearn.preprocessing", feature).StandardScaler

        y = hard.cpu().numpy().astype(int)
        if y.min() == y.max():
            raise ConfigError("the router needs both hard and not-hard samples to learn from")
        self._model = make_pipeline(
            StandardScaler(), LogisticRegression(C=self.c, max_iter=self.max_iter)
        )
        self._model.fit(z.detach().float().flatten(1).cpu().numpy(), y)
        return self

    def predict_proba(self, z: Tensor) -> Tensor:
        """``[N]`` probability of being hard."""
        if self._model is None:
            raise ConfigError("call fit() before predict_proba()")
        p = self._model.predict_proba(z.detach().float().flatten(1).cpu().numpy())[:, 1]
        return torch.from_numpy(p).float()

    def route(self, z: Tensor, threshold: float = 0.5) -> Tensor:
        """``[N]`` bool: send straight to the deep end."""
        return self.predict_proba(z) >= threshold


def plot_data_map(
    data_map: DataMap,
    path: str,
    exit: int | None = None,
    *,
    title: str | None = None,
    max_points: int = 5000,
) -> None:
    """Save the data map as a PNG: variability (x) against confidence (y), coloured by region,
    with the correctness share as marker size where known.

    Example:
        >>> plot_data_map(dm, "benchmarks/results/data_map.png")  # doctest: +SKIP
    """
    matplotlib = import_demo_package("matplotlib", "plot_data_map")
    matplotlib.use("Agg")
    plt = import_demo_package("matplotlib.pyplot", "plot_data_map")

    conf, var = data_map.summary(exit)
    regions = data_map.regions(exit)
    corr = data_map.correctness.nanmean(dim=1) if exit is None else data_map.correctness[:, exit]
    keep = torch.randperm(conf.numel(), generator=torch.Generator().manual_seed(0))[:max_points]
    fig, ax = plt.subplots(figsize=(6, 5))
    colours = ("tab:green", "tab:orange", "tab:red")
    for r, name in enumerate(REGION_NAMES):
        m = keep[regions[keep] == r]
        size = torch.where(torch.isnan(corr[m]), torch.tensor(0.5), corr[m]) * 20 + 4
        ax.scatter(var[m], conf[m], s=size, c=colours[r], alpha=0.6, label=f"{name} ({m.numel()})")
    ax.set_xlabel("variability (std of teacher-class probability)")
    ax.set_ylabel("confidence (mean teacher-class probability)")
    where = "mean over exits" if exit is None else f"exit {exit}"
    ax.set_title(title or f"Data map of the exit heads ({where})")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = [
    "AMBIGUOUS",
    "EASY",
    "HARD",
    "REGION_NAMES",
    "CartographyMeter",
    "DataMap",
    "DifficultyRouter",
    "classify_regions",
    "plot_data_map",
    "train_heads_offline",
]
