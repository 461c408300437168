"""Cascades: local, ensemble, early-exit and loopback-HTTP remote tiers; calibration; failures."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch
from torch import nn

import earlyexit as ee
from earlyexit.cascade import (
    Cascade,
    EarlyExitTier,
    EnsembleTier,
    LocalTier,
    RemoteTier,
    RemoteTierError,
)
from earlyexit.cascade._loopback import ModelServer
from earlyexit.errors import ConfigError
from earlyexit.gates import AgreementGate, Gate, GateContext
from earlyexit.supervisors import Supervisor, UntrustedPredictionError


class ScriptedGate(Gate):
    """Tier ``t`` lets out exactly the caller rows in ``plan[t]``."""

    name = "scripted"

    def __init__(self, plan: dict[int, set[int]]) -> None:
        self.plan = plan

    def score(self, logits: torch.Tensor, ctx: GateContext) -> torch.Tensor:
        chosen = self.plan.get(ctx.exit_index, set())
        return torch.tensor([1.0 if int(r) in chosen else 0.0 for r in ctx.rows])


def tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def test_cascade_of_local_ensemble_early_exit_and_remote_tiers(resnet):
    x = batch(n=7)
    small = tiny(0)
    members = [tiny(1), tiny(2), tiny(3)]
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    big = tiny(4)
    with ModelServer(big, max_requests=10) as server:
        remote = RemoteTier(server.url, cost_per_call=1000.0, cost_per_sample=1.0, timeout=10.0)
        cascade = Cascade(
            [LocalTier(small, cost=5.0), EnsembleTier(members, costs=[2.0] * 3), eem, remote],
            gate=ScriptedGate({0: {0, 1}, 1: {2}, 2: {3, 4}}),
            thresholds=[0.5, 0.5, 0.5],
        )
        assert isinstance(cascade.tiers[2], EarlyExitTier)
        res = cascade.predict(x)
        assert res.exit_index.tolist() == [0, 0, 1, 2, 2, 3, 3]
        assert server.requests == 1  # one call, carrying only rows 5 and 6
        with torch.no_grad():
            torch.testing.assert_close(res.logits[:2], small(x[:2]))
            probs = torch.stack([m(x[2:3]).softmax(-1) for m in members]).mean(0)
            torch.testing.assert_close(res.logits[2:3], probs.log())
            torch.testing.assert_close(res.logits[3:5], resnet(x[3:5]))
            torch.testing.assert_close(res.logits[5:], big(x[5:]))
        full_path = eem.path_macs()[-1]  # gates closed: the full resnet per sample
        expected = [5.0, 5.0, 11.0, 11.0 + full_path, 11.0 + full_path]
        expected += [11.0 + full_path + 500.0 + 1.0] * 2
        assert cascade.last_cost.tolist() == pytest.approx(expected)
        assert cascade.stats.reached == [7, 5, 4, 2] and cascade.stats.answered == [2, 1, 2, 2]


def test_agreement_gate_votes_among_ensemble_members():
    x = batch(n=3)
    same = tiny(1)
    cascade = Cascade(
        [EnsembleTier([same, same, tiny(2)]), tiny(3)],
        gate=AgreementGate(),
        thresholds=[0.6],
    )
    rec = cascade.record(x)
    with torch.no_grad():
        other = tiny(2)(x).argmax(-1) == same(x).argmax(-1)
    assert rec.scores[:, 0].tolist() == pytest.approx(torch.where(other, 1.0, 2 / 3).tolist())
    assert cascade.predict(x).exit_index.tolist() == [0, 0, 0]


def test_calibrate_and_simulate_agree_with_serving():
    x = batch(n=64, seed=3)
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(7))
    cascade = Cascade([tiny(0), tiny(5), tiny(6)], gate="margin")
    rec = cascade.record(x, labels=labels)
    assert rec.logits.shape == (64, 3, 10) and rec.scores.shape == (64, 3)
    cal = cascade.calibrate(rec, target=0.5, confidence=0.6)
    assert len(cal.thresholds) == 2 and cascade.thresholds == cal.thresholds
    with torch.no_grad():
        last = tiny(6)(x).argmax(-1)  # the last tier on its own, outside the cascade
    # Halfway between two neighbouring recorded scores, so that about half the rows pass each
    # gate (a threshold on a score itself could tip either way between batch sizes).
    middle = [float(s[31] + s[32]) / 2 for s in rec.scores[:, :2].sort(dim=0).values.T]
    mixes = []
    for thresholds in ([0.05, 0.02], list(cascade.thresholds), [math.inf, -math.inf], middle):
        sim = cascade.simulate(rec, thresholds)
        cascade.set_thresholds(thresholds)
        res = cascade.predict(x)
        assert sim["exit_index"].tolist() == res.exit_index.tolist()
        assert sim["cost"] == pytest.approx(float(cascade.last_cost.mean()))
        # Agreement and accuracy counted from what serving answered, against the last tier run
        # alone and the labels: counts out of 64 are exact in floating point.
        served = res.logits.argmax(-1)
        assert sim["agreement"] == int((served == last).sum()) / 64
        assert sim["accuracy"] == int((served == labels).sum()) / 64
        assert sim["accuracy_last"] == int((last == labels).sum()) / 64
        counts = torch.bincount(res.exit_index, minlength=3).tolist()
        assert sim["tier_rates"] == [c / 64 for c in counts]
        mixes.append((counts, sim["agreement"]))
    counts, agreement = mixes[-1]  # the middle thresholds: every tier answers some rows
    assert min(counts) > 0 and 0.0 < agreement < 1.0
    assert cascade.simulate(rec, [math.inf, math.inf])["cost_saving"] < 0  # pays every tier
    with pytest.raises(ConfigError, match="2 thresholds"):
        cascade.set_thresholds([0.5])


def test_final_supervisor_in_a_cascade():
    x = batch(n=4)
    cascade = Cascade([tiny(0), tiny(1)], supervisor=Supervisor("max_softmax", 2.0))
    assert not cascade.predict(x).accepted.any()  # nothing is that sure
    cascade.supervisor.policy = "raise"
    with pytest.raises(UntrustedPredictionError) as info:
        cascade.predict(x)
    assert info.value.result.exit_index.tolist() == [1] * 4


def test_remote_failures_are_clear_errors():
    x = batch(n=2)

    def broken(_x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("model exploded")

    cases = [
        (broken, {}, r"HTTP 500.*model exploded"),
        (lambda t: torch.zeros(t.shape[0] + 1, 10), {}, r"returned shape"),
        (tiny(0), {"timeout": 0.2}, r"did not answer within 0\.2 s"),
    ]
    for model, options, message in cases:
        with (
            ModelServer(model, delay=2.0 if options else 0.0) as server,
            pytest.raises(RemoteTierError, match=message),
        ):
            RemoteTier(server.url, **options).run(x)
    # Bounded: after max_requests the server stops by itself and the next call fails.
    with ModelServer(tiny(0), max_requests=1) as server:
        tier = RemoteTier(server.url, max_batch=1)
        with pytest.raises(RemoteTierError, match=r"HTTP 503|unreachable"):
            tier.run(x)  # two calls of one sample each: the second finds no server
        assert server.requests == 1
    with pytest.raises(ConfigError, match="loopback"):
        ModelServer(tiny(0), host="0.0.0.0")
    with pytest.raises(ConfigError, match="http"):
        RemoteTier("ftp://example")


def test_tier_construction_from_plain_objects(resnet):
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    cascade = Cascade([tiny(0), [tiny(1), tiny(2)], eem])
    kinds = [type(t).__name__ for t in cascade.tiers]
    assert kinds == ["LocalTier", "EnsembleTier", "EarlyExitTier"]
    assert cascade.thresholds == (math.inf, math.inf)
    with pytest.raises(ConfigError, match="tier 0"):
        Cascade(["model.pt"])
