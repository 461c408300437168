"""One exit rule: live serving and offline replay take the same decision for the same scores."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch
from torch import nn

import earlyexit as ee
from earlyexit.cascade import Cascade
from earlyexit.errors import ConfigError
from earlyexit.evaluation.policies import threshold_exits
from earlyexit.evaluation.stream import record_stream
from earlyexit.gates import Gate, GateContext
from earlyexit.routing import (
    check_thresholds,
    exit_path_macs,
    first_exit,
    heads_evaluated,
    scatter_answers,
    simulate_exits,
)


class TableGate(Gate):
    """Scores read from a table ``[B, E + 1]``: row = caller row, column = exit (last: final)."""

    name = "table"

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def score(self, logits: torch.Tensor, ctx: GateContext) -> torch.Tensor:
        return self.table[ctx.rows.cpu(), ctx.exit_index].to(logits.device)


def _thresholds(generator: torch.Generator, count: int) -> list[float]:
    """Random thresholds, with closed (inf) and always-open (-inf) gates mixed in."""
    out = []
    for _ in range(count):
        pick = int(torch.randint(0, 5, (1,), generator=generator))
        if pick == 0:
            out.append(math.inf)
        elif pick == 1:
            out.append(-math.inf)
        else:
            out.append(float(torch.rand(1, generator=generator)))
    return out


def test_serving_matches_simulation_on_random_scores(resnet):
    eem = ee.wrap(resnet)
    x = batch(n=24, seed=3)
    generator = torch.Generator().manual_seed(0)
    for trial in range(12):
        table = torch.rand(24, eem.num_exits + 1, generator=generator)
        if trial % 3 == 0:  # ties with the threshold itself must pass in both
            table[:, :-1] = 0.5
        thresholds = (
            [0.5] * eem.num_exits if trial % 3 == 0 else _thresholds(generator, eem.num_exits)
        )
        eem.gate = TableGate(table)
        eem.set_thresholds(thresholds)
        served = eem.predict(x).exit_index
        replayed = simulate_exits(table[:, :-1], thresholds)
        assert torch.equal(served, replayed), (trial, thresholds)


def test_stream_replay_matches_what_the_wrapper_served(resnet):
    eem = ee.wrap(resnet)
    generator = torch.Generator().manual_seed(1)
    x = batch(n=20, seed=4)
    eem.gate = TableGate(torch.rand(20, eem.num_exits + 1, generator=generator))
    thresholds = [0.7, 0.4, 0.9, 0.6][: eem.num_exits]
    eem.set_thresholds(thresholds)
    record = record_stream(eem, x, batch_size=20)
    assert torch.equal(record.served_exit, threshold_exits(record, thresholds))
    assert torch.equal(record.served_exit, eem.predict(x).exit_index)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval()


def test_cascade_serving_matches_its_simulation_on_random_scores():
    x = torch.randn(30, 3, 2, 2)
    generator = torch.Generator().manual_seed(2)
    for _ in range(10):
        table = torch.rand(30, 4, generator=generator)
        cascade = Cascade([_net(0), _net(1), _net(2), _net(3)], gate=TableGate(table))
        thresholds = _thresholds(generator, 3)
        cascade.set_thresholds(thresholds)
        served = cascade.predict(x).exit_index
        record = cascade.record(x)
        assert torch.equal(record.scores, table)
        simulated = cascade.simulate(record)["exit_index"]
        assert torch.equal(served, simulated), thresholds
        # The same rule as the model's: the last tier is "ran to the end".
        assert torch.equal(served, simulate_exits(table[:, :-1], thresholds))


def test_simulate_exits_rule():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.95], [0.1, 0.1], [float("nan"), 0.5]])
    assert simulate_exits(scores, [0.8, 0.9]).tolist() == [0, 1, 2, 2]
    assert simulate_exits(scores, [math.inf, -math.inf]).tolist() == [1, 1, 1, 1]
    assert simulate_exits(scores, [0.9, 0.95]).tolist() == [0, 1, 2, 2]  # >= passes
    # A Python float threshold between two float32 values compares in float32, as serving does.
    score = torch.tensor([[0.1]], dtype=torch.float32)
    assert simulate_exits(score, [0.1000000020]).tolist() == [0]
    assert bool((score[0] >= 0.1000000020).all())
    with pytest.raises(ConfigError, match="expected 2 thresholds"):
        simulate_exits(scores, [0.5])
    assert first_exit(torch.zeros(3, 0, dtype=torch.bool)).tolist() == [0, 0, 0]


def test_check_thresholds():
    assert check_thresholds([1, "0.5", -math.inf], 3) == (1.0, 0.5, -math.inf)
    with pytest.raises(ConfigError, match="expected 2 thresholds \\(one per tier\\)"):
        check_thresholds([0.1], 2, per="tier")
    with pytest.raises(ConfigError, match="threshold 1 is NaN"):
        check_thresholds([0.1, math.nan], 2)
    with pytest.raises(ConfigError, match="must be a number"):
        check_thresholds([0.1, "high"], 2)


def test_path_costs_and_heads():
    assert heads_evaluated([False, True, False], needs_history=True) == (True, True, False)
    assert heads_evaluated([False, True, False], needs_history=False) == (False, True, False)
    assert exit_path_macs([10, 20], [1, 2], 30, [True, True]) == (11, 23, 33)
    assert exit_path_macs([10, 20], [1, 2], 30, [False, False]) == (10, 20, 30)


def test_scatter_answers_puts_rows_back_in_order():
    answers = [
        (torch.tensor([2, 0]), torch.tensor([[1.0, 0.0], [2.0, 0.0]]), 0, torch.tensor([0.9, 0.8])),
        (torch.tensor([1]), torch.tensor([[0.0, 3.0]]), 2, torch.tensor([0.1])),
    ]
    logits, exit_index, confidence = scatter_answers(
        answers, 3, num_classes=2, dtype=torch.float64, device=torch.device("cpu")
    )
    assert logits.dtype == torch.float64
    assert logits.tolist() == [[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]]
    assert exit_index.tolist() == [0, 2, 0]
    assert confidence.tolist() == pytest.approx([0.8, 0.1, 0.9])
