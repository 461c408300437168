"""MixMonitor: notices when the class mix of served traffic leaves the one the gates were proven on.

Both guarantees assume that tomorrow's traffic looks like the evidence the thresholds were tested
on. When the mix of classes shifts (a new season, a new client), heads that were sure and right on
the classes that dominated may be sure and wrong on the ones that now do, and the audits that watch
for it (the drift monitor) are few: a drop from 99% to 98.6% agreement takes thousands of audits to
prove. The served answers' classes are free, though: every answer has one. So the monitor compares
the class histogram of each window of served answers with the histogram of the evidence behind the
thresholds in force (a two-sample chi-square test on classes pooled into buckets large enough for
the test to hold), and raises an alarm when they provably differ. The learner then treats the
evidence as stale: gates close, and reopen once evidence from the new mix supports them.

The reference is taken at each publication, from the evidence it was calibrated on. The monitor
is not saved (nor its alarm count): a loaded learner watches again from its next calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy import stats
from torch import Tensor

#: Served answers per window tested against the reference.
MIX_WINDOW = 512
#: Level of the test: an alarm on a stationary stream is a one-in-a-million event per window.
MIX_ALPHA = 1e-6
#: Expected count per bucket (in the window) below which classes are pooled with their neighbours.
MIN_EXPECTED = 10.0


@dataclass
class MixShift:
    """The served mix left the evidence's: ``statistic`` (chi-square, ``dof`` degrees of freedom)
    over ``samples`` served answers, p-value ``pvalue``."""

    samples: int
    statistic: float
    dof: int
    pvalue: float

    def __str__(self) -> str:
        return (
            f"the class mix of the last {self.samples} served answers differs from the evidence's "
            f"(chi-square {self.statistic:.1f} on {self.dof} degrees of freedom, p = "
            f"{self.pvalue:.2g})"
        )


def chi2_upper_tail(statistic: float, dof: int) -> float:
    """P(X >= ``statistic``) for X ~ chi-square(``dof``) (1 when there is nothing to test).

    Example:
        >>> round(chi2_upper_tail(3.841, 1), 3), round(chi2_upper_tail(18.307, 10), 3)
        (0.05, 0.05)
    """
    if dof < 1 or statistic <= 0.0:
        return 1.0
    return float(stats.chi2.sf(statistic, dof))


def mix_test(window: Tensor, reference: Tensor) -> tuple[float, int, float]:
    """Two-sample chi-square test of homogeneity between two class histograms, on buckets of
    classes (in order of their pooled counts) pooled until each expects ``MIN_EXPECTED`` counts in
    the smaller sample. Returns (statistic, degrees of freedom, p-value).

    Example:
        >>> same = torch.tensor([100.0, 100.0, 100.0])
        >>> mix_test(same, same * 10)[2] > 0.5
        True
        >>> mix_test(torch.tensor([250.0, 25.0, 25.0]), same * 10)[2] < 1e-6
        True
    """
    a, b = window.double(), reference.double()
    n_a, n_b = float(a.sum()), float(b.sum())
    if n_a <= 0 or n_b <= 0:
        return 0.0, 0, 1.0
    total = a + b
    # Buckets follow the pooled counts, which say nothing about how each class splits between
    # the two samples when the mixes agree (ordering by one sample's counts would favour the
    # classes it happened to over-draw, and raise false alarms).
    order = torch.argsort(total, descending=True, stable=True)
    buckets_a, buckets_b, acc_a, acc_b, acc_t = [], [], 0.0, 0.0, 0.0
    scale = min(n_a, n_b) / (n_a + n_b)
    for c in order.tolist():
        acc_a += float(a[c])
        acc_b += float(b[c])
        acc_t += float(total[c])
        if acc_t * scale >= MIN_EXPECTED:
            buckets_a.append(acc_a)
            buckets_b.append(acc_b)
            acc_a = acc_b = acc_t = 0.0
    if acc_t > 0 and buckets_a:  # the rare tail joins the last bucket
        buckets_a[-1] += acc_a
        buckets_b[-1] += acc_b
    if len(buckets_a) < 2:
        return 0.0, 0, 1.0
    statistic = 0.0
    for o_a, o_b in zip(buckets_a, buckets_b, strict=True):
        t = o_a + o_b
        e_a, e_b = t * n_a / (n_a + n_b), t * n_b / (n_a + n_b)
        statistic += (o_a - e_a) ** 2 / e_a + (o_b - e_b) ** 2 / e_b
    dof = len(buckets_a) - 1
    return statistic, dof, chi2_upper_tail(statistic, dof)


class MixMonitor:
    """Class histogram of served answers, window by window, against the evidence's.

    Example:
        >>> monitor = MixMonitor(num_classes=3)
        >>> monitor.set_reference(torch.tensor([0, 1, 2] * 300))
        >>> monitor.record(torch.tensor([170, 171, 171]))  # one window, as the evidence: quiet
        >>> monitor.record(torch.tensor([500, 6, 6])) is not None  # the mix moved: an alarm
        True
    """

    def __init__(self, num_classes: int, window: int = MIX_WINDOW, alpha: float = MIX_ALPHA):
        self.num_classes = num_classes
        self.window_size = window
        self.alpha = alpha
        self.reference: Tensor | None = None  # class counts of the evidence in force
        self.window = torch.zeros(num_classes, dtype=torch.int64)
        self.window_samples = 0
        self.alarms = 0

    def set_reference(self, labels: Tensor | None) -> None:
        """The evidence behind the thresholds just published (``labels``: the full model's class
        of each evidence row; ``None``: nothing to watch, and the window is emptied). A window
        being filled goes on: recalibrations may come more often than a window fills."""
        if labels is None or labels.numel() == 0:
            self.reference = None
            self.window = torch.zeros(self.num_classes, dtype=torch.int64)
            self.window_samples = 0
        else:
            self.reference = torch.bincount(labels.long().cpu(), minlength=self.num_classes)

    def record(self, counts: Tensor) -> MixShift | None:
        """Add a batch's served answers (``counts``: per class); at each full window, test it
        against the reference. Returns the alarm, if any (then watching stops until the next
        :meth:`set_reference`)."""
        if self.reference is None:
            return None
        self.window = self.window + counts.long().cpu()  # a new tensor: undo keeps the old one
        self.window_samples += int(counts.sum())
        if self.window_samples < self.window_size:
            return None
        window, self.window = self.window, torch.zeros(self.num_classes, dtype=torch.int64)
        samples, self.window_samples = self.window_samples, 0
        statistic, dof, pvalue = mix_test(window, self.reference)
        if pvalue >= self.alpha:
            return None
        self.alarms += 1
        self.reference = None
        return MixShift(samples, statistic, dof, pvalue)
