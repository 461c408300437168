"""Recording a stream and simulating policies on it: exact accounting, oracle, sweeps, and the
simulation checked against the wrapper's real serving."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES

import earlyexit as ee
from earlyexit.evaluation.policies import (
    evaluate_exits,
    evaluate_policy,
    oracle_exits,
    patience_exits,
    sweep_patience,
    sweep_thresholds,
    threshold_exits,
)
from earlyexit.evaluation.stream import StreamRecord, iterate_batches, record_stream

SIZE = (3, 32, 32)


def _randomise_heads(eem: ee.EarlyExitModel, seed: int = 0) -> None:
    """Give the zero-initialised heads random weights so scores and argmaxes vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in eem.heads:
            head.fc.weight.copy_(torch.randn(head.fc.weight.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    model = FAMILIES["timm.resnet"][0]().eval()
    eem = ee.wrap(model, input_size=SIZE)
    _randomise_heads(eem)
    x = torch.randn(48, *SIZE, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(48) % 10
    return eem, x, labels


@pytest.fixture(scope="module")
def record(served):
    eem, x, labels = served
    return record_stream(eem, x, labels=labels, batch_size=16, keep_features=True)


def _hand_record() -> StreamRecord:
    # 2 exits, 5 samples. backbone 10 / 30, heads 1 / 2, base 100.
    return StreamRecord(
        scores=torch.tensor([[0.9, 0.1], [0.2, 0.95], [0.1, 0.2], [0.8, 0.99], [0.5, 0.5]]),
        max_prob=torch.tensor([[0.9, 0.1], [0.2, 0.95], [0.1, 0.2], [0.8, 0.99], [0.5, 0.5]]),
        preds=torch.tensor([[1, 2], [0, 3], [4, 4], [7, 7], [5, 6]]),
        final_pred=torch.tensor([1, 3, 9, 7, 6]),
        labels=torch.tensor([1, 3, 4, 0, 6]),
        backbone_macs=(10, 30),
        head_macs=(1, 2),
        base_macs=100,
    )


def test_expected_macs_are_exact_on_a_scripted_stream():
    rec = _hand_record()
    # thresholds 0.7 / 0.9: sample 0 -> exit 0, 1 -> exit 1, 2 -> end, 3 -> exit 0, 4 -> end.
    exits = threshold_exits(rec, [0.7, 0.9])
    assert exits.tolist() == [0, 1, 2, 0, 2]
    point = evaluate_exits(rec, exits, thresholds=[0.7, 0.9])
    # Path costs with both gates open: exit0 10+1, exit1 30+1+2, end 100+1+2.
    assert rec.path_macs([0.7, 0.9]) == (11, 33, 103)
    assert point.expected_macs == pytest.approx((11 + 33 + 103 + 11 + 103) / 5)
    assert point.mac_saving == pytest.approx(1 - (11 + 33 + 103 + 11 + 103) / 500)
    # Answers: 1 (agrees), 3 (agrees), 9 (full), 7 (agrees), 6 (full) -> agreement 1.
    assert point.agreement == 1.0
    assert point.accuracy == pytest.approx(3 / 5)  # labels 1, 3, 4, 0, 6 vs answers 1, 3, 9, 7, 6
    assert point.exit_rates == (0.4, 0.2, 0.4)
    assert point.exit_agreement == (1.0, 1.0, 1.0)
    # Closing exit 1 skips its head: the end path no longer pays for it.
    assert rec.path_macs([0.7, math.inf]) == (11, 31, 101)
    closed = evaluate_policy(rec, "threshold", thresholds=[0.7, math.inf])
    assert closed.expected_macs == pytest.approx((11 + 101 + 101 + 11 + 101) / 5)
    # A gate that looks back (needs_history) keeps earlier heads running.
    rec.needs_history = True
    assert rec.path_macs([math.inf, 0.5]) == (11, 33, 103)


def test_oracle_and_patience_on_hand_made_data():
    rec = _hand_record()
    # First head agreeing with the final argmax: 0 -> exit 0, 1 -> exit 1, 2 -> none, 3 -> exit 0,
    # 4 -> exit 1.
    assert oracle_exits(rec).tolist() == [0, 1, 2, 0, 1]
    oracle = evaluate_policy(rec, "oracle")
    assert oracle.agreement == 1.0
    assert oracle.expected_macs == pytest.approx((11 + 33 + 103 + 11 + 33) / 5)
    # Patience 1: leave at exit 1 when it repeats exit 0's argmax (samples 2 and 3).
    assert patience_exits(rec, 1).tolist() == [2, 2, 1, 1, 2]
    with pytest.raises(ValueError):
        patience_exits(rec, 0)


def test_patience_counts_consecutive_agreement():
    preds = torch.tensor([[1, 1, 2, 2, 2], [3, 3, 3, 3, 3], [1, 2, 3, 4, 5]])
    rec = StreamRecord(
        scores=torch.zeros(3, 5), max_prob=torch.zeros(3, 5), preds=preds,
        final_pred=torch.tensor([2, 3, 6]), labels=None,
        backbone_macs=(1, 2, 3, 4, 5), head_macs=(0,) * 5, base_macs=10,
    )  # fmt: skip
    assert patience_exits(rec, 1).tolist() == [1, 1, 5]
    assert patience_exits(rec, 2).tolist() == [4, 2, 5]
    assert patience_exits(rec, 4).tolist() == [5, 4, 5]


def test_record_matches_what_was_served_and_changes_nothing(served, record):
    eem, x, labels = served
    assert record.num_samples == 48 and record.num_exits == eem.num_exits
    assert torch.equal(record.labels, labels)
    assert all(t == math.inf for t in eem.thresholds)  # recording set no thresholds
    assert torch.equal(record.served_exit, torch.full((48,), eem.num_exits))
    # Gates closed: the final argmax is the base model's.
    with torch.no_grad():
        assert torch.equal(record.final_pred, eem.base_model(x).argmax(-1))
    for i in range(eem.num_exits):
        assert record.path_macs() == eem.path_macs([-math.inf] * eem.num_exits)
        thresholds = [math.inf] * eem.num_exits
        thresholds[i] = 0.5
        assert record.path_macs(thresholds) == eem.path_macs(thresholds)


def test_simulation_equals_real_predict(served, record):
    eem, x, _ = served
    # Thresholds halfway between observed scores, so no sample sits on a boundary.
    for qs in ([0.9, 0.8, 0.7, 0.6], [0.5, 0.95, 0.3, 0.8], [0.99, 0.99, 0.2, 0.1]):
        thresholds = []
        for i, q in enumerate(qs):
            s = torch.sort(record.scores[:, i]).values
            k = min(int(q * len(s)), len(s) - 2)
            thresholds.append(float((s[k] + s[k + 1]) / 2))
        eem.set_thresholds(thresholds)
        try:
            real = torch.cat([eem.predict(x[i : i + 16]).exit_index for i in range(0, 48, 16)])
        finally:
            eem.set_thresholds([math.inf] * eem.num_exits)
        simulated = threshold_exits(record, thresholds)
        assert torch.equal(real, simulated)
        assert len(set(real.tolist())) > 1  # a real mix, not a trivial one


def test_sweep_endpoints_and_monotonicity(record):
    curve = sweep_thresholds(record)
    first, last = curve[0], curve[-1]
    assert first.param == math.inf and first.agreement == 1.0 and first.mac_saving == 0.0
    assert first.exit_rates[-1] == 1.0
    assert last.param == -math.inf and last.exit_rates[0] == 1.0
    exit0 = record.path_macs([-math.inf] * record.num_exits)[0]
    assert last.expected_macs == exit0
    # Lowering the shared threshold only moves samples earlier, so MACs never grow (finite part).
    finite = [p for p in curve if p.param is not None and math.isfinite(p.param)]
    thresholds = [p.param for p in finite]
    assert thresholds == sorted(thresholds, reverse=True)
    macs = [p.expected_macs for p in finite]
    assert macs == sorted(macs, reverse=True)
    previous = None
    for p in finite:
        exits = threshold_exits(record, [p.param] * record.num_exits)
        if previous is not None:
            assert bool((exits <= previous).all())
        previous = exits


def test_patience_sweep_and_named_policies(record):
    curve = sweep_patience(record)
    assert [p.param for p in curve] == list(range(1, record.num_exits))
    full = evaluate_policy(record, "full")
    assert full.mac_saving == 0.0 and full.agreement == 1.0
    oracle = evaluate_policy(record, "oracle")
    assert oracle.agreement == 1.0 and oracle.mac_saving >= 0.0
    with pytest.raises(ValueError):
        evaluate_policy(record, "nope")


def test_with_heads_rescoring_reproduces_the_record(served, record):
    eem, _, _ = served
    again = record.with_heads(list(eem.heads), eem.gate)
    assert torch.equal(again.preds, record.preds)
    torch.testing.assert_close(again.scores, record.scores, rtol=1e-5, atol=1e-5)
    sub = record.subset(slice(0, 10))
    assert sub.num_samples == 10 and sub.features[0].shape[0] == 10


def test_iterate_batches_accepts_tensors_datasets_and_loaders():
    x = torch.zeros(5, 3, 4, 4)
    y = torch.arange(5)
    assert [b.shape[0] for b, _ in iterate_batches(x, y, 2)] == [2, 2, 1]
    ds = torch.utils.data.TensorDataset(x, y)
    got = list(iterate_batches(ds, batch_size=4))
    assert [b.shape[0] for b, _ in got] == [4, 1] and torch.equal(got[0][1], y[:4])
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    assert [b.shape[0] for b, _ in iterate_batches(loader)] == [3, 2]
    with pytest.raises(ValueError):
        list(iterate_batches(x, y[:3]))


def test_record_with_open_gates_still_sees_every_head(served, record):
    eem, x, _ = served
    thresholds = [float(record.scores[:, i].median()) for i in range(eem.num_exits)]
    eem.set_thresholds(thresholds)
    try:
        again = record_stream(eem, x, batch_size=16)
    finally:
        eem.set_thresholds([math.inf] * eem.num_exits)
    # Every sample is audited, so heads and the full model are recorded for all of them ...
    torch.testing.assert_close(again.scores, record.scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(again.final_pred, record.final_pred)
    # ... and where the wrapper answered is exactly what the simulation says.
    assert torch.equal(again.served_exit, threshold_exits(again, thresholds))
    assert again.recorded_thresholds == tuple(thresholds)
