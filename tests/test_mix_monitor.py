"""The mix monitor: a shift of the served class mix away from the evidence closes the gates."""

from __future__ import annotations

import math

import pytest
import torch
from test_distill import quick, stream, toy_wrap

from earlyexit.distill import OnlineDistiller
from earlyexit.distill.mix import MIX_WINDOW, MixMonitor, chi2_upper_tail, mix_test
from earlyexit.distill.rows import BatchRows
from earlyexit.errors import InputError


@pytest.mark.parametrize(
    ("statistic", "dof", "tail"),
    [(3.841, 1, 0.05), (18.307, 10, 0.05), (67.505, 50, 0.05), (23.209, 10, 0.01)],
)
def test_the_chi_square_tail_matches_published_quantiles(statistic, dof, tail):
    assert chi2_upper_tail(statistic, dof) == pytest.approx(tail, rel=2e-3)


def test_same_mix_is_quiet_and_a_moved_mix_is_not():
    reference = torch.tensor([3000, 3000, 3000, 1000])
    assert mix_test(torch.tensor([150, 150, 150, 50]), reference)[2] > 0.9
    statistic, dof, pvalue = mix_test(torch.tensor([50, 50, 150, 250]), reference)
    assert dof == 3 and statistic > 100 and pvalue < 1e-12


def test_rare_classes_are_pooled_so_a_thousand_classes_raise_no_false_alarm():
    """1000 classes, Zipf-like, 512 answers a window: most classes expect far less than one
    count; pooled into buckets, 300 windows drawn from the evidence's own mix stay quiet."""
    g = torch.Generator().manual_seed(0)
    probs = 1.0 / torch.arange(1, 1001, dtype=torch.float64)
    probs /= probs.sum()
    monitor = MixMonitor(num_classes=1000)
    monitor.set_reference(torch.multinomial(probs, 12000, replacement=True, generator=g))
    for _ in range(300):
        drawn = torch.multinomial(probs, MIX_WINDOW, replacement=True, generator=g)
        assert monitor.record(torch.bincount(drawn, minlength=1000)) is None
    # The same classes in reversed popularity: found at the first window.
    reversed_probs = probs.flip(0)
    drawn = torch.multinomial(reversed_probs, MIX_WINDOW, replacement=True, generator=g)
    shift = monitor.record(torch.bincount(drawn, minlength=1000))
    assert shift is not None and shift.samples == MIX_WINDOW and shift.pvalue < 1e-6
    assert monitor.alarms == 1 and monitor.reference is None  # watching stops until reset


def test_without_a_reference_nothing_is_watched():
    monitor = MixMonitor(num_classes=3)
    assert monitor.record(torch.tensor([10_000, 0, 0])) is None
    assert monitor.window_samples == 0


def test_a_learner_closes_its_gates_when_the_served_mix_moves_and_keeps_its_heads():
    learner = OnlineDistiller(toy_wrap(), quick())
    g = torch.Generator().manual_seed(0)
    for _ in range(12):  # the three classes evenly: gates open
        learner.step(stream(64, g))
    eem = learner.eem
    assert any(t < math.inf for t in eem.thresholds)
    assert learner.mix.reference is not None
    steps, replay_rows, epoch = learner.trainer.train_steps, len(learner.trainer.replay), None
    epoch = learner.schedule.epoch
    # Now only what the full model calls class 0 arrives.
    served = 0
    while learner.stats()["mix_shifts"] == 0 and served < 4 * MIX_WINDOW:
        x = stream(256, g)
        with torch.no_grad():
            x = x[eem.base_model(x).argmax(dim=1) == 0][:64]
        learner.step(x)
        served += x.shape[0]
    stats = learner.stats()
    assert stats["mix_shifts"] == 1 and served <= MIX_WINDOW + 64
    assert all(t == math.inf for t in eem.thresholds)
    assert stats["phase"].startswith("drift: the class mix of the last")
    assert learner.schedule.epoch == epoch + 1 and len(learner.evidence) == 0
    # The heads keep what they learned (each class still looks the same): replay stays.
    assert len(learner.trainer.replay) >= replay_rows and learner.trainer.train_steps >= steps


def test_rows_with_a_bad_class_histogram_are_refused_and_change_nothing():
    learner = OnlineDistiller(toy_wrap(), quick())
    before = learner.stats()
    for bad in (torch.tensor([1, 2]), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, -1, 0])):
        with pytest.raises(InputError, match=r"rows.classes must be a \[3\] int64"):
            learner.record(BatchRows([0, 0, 3], 10, [], 0, classes=bad))
    assert learner.stats() == before
