"""The expected-disagreement guarantee: conformal risk control (``calibrate_risk_control``) and
``DistillConfig.guarantee`` through the learner, its stats and its saved files."""

from __future__ import annotations

import math

import pytest
import torch
from test_distill import Toy, quick, run, toy_wrap

from earlyexit.calibration import (
    calibrate_joint,
    calibrate_risk_control,
    min_evidence,
    risk_control_min_evidence,
    risk_envelope,
)
from earlyexit.distill import DistillConfig, OnlineDistiller
from earlyexit.distill.calibrator import PolicyCalibrator
from earlyexit.distill.drift import DriftMonitor
from earlyexit.errors import ConfigError
from earlyexit.io import save_early_exit_model
from earlyexit.routing import simulate_exits

INF = math.inf


# ------------------------------------------------------------------------------ the CRC maths
def test_min_evidence_is_one_over_alpha_minus_one():
    assert risk_control_min_evidence(0.99) == 99
    assert risk_control_min_evidence(0.95) == 19
    assert risk_control_min_evidence(0.9) == 9  # 1 - 0.9 is 0.0999..98 in floats: still 9
    assert risk_control_min_evidence(0.5) == 1
    assert min_evidence(0.99, 0.05, 1) > 4 * risk_control_min_evidence(0.99)


def test_envelope_is_the_largest_threshold_with_a_wrong_early_answer():
    scores = torch.tensor([[0.5, 0.8], [0.8, 0.5], [0.3, 0.3], [0.9, 0.2], [float("nan"), 0.6]])
    agree = torch.tensor(
        [[True, False], [True, False], [False, False], [True, True], [False, False]]
    )
    # Row 0: exit 1 serves (wrongly) for lam in (0.5, 0.8], exit 0 (rightly) below: not
    # monotone, envelope 1 up to 0.8. Row 1: exit 0 always passes first. Row 2: exit 0 first,
    # wrong. Row 3: nothing wrong. Row 4: a NaN score never passes, exit 1 wrong at 0.6.
    got = risk_envelope(scores, agree)
    want = torch.tensor([0.8, -INF, 0.3, -INF, 0.6])
    assert torch.equal(got, want.float())
    # With exit 0 off, exit 1 alone decides.
    got = risk_envelope(scores, agree, enabled=[False, True])
    assert torch.equal(got, torch.tensor([0.8, 0.5, 0.3, -INF, 0.6]).float())
    # The envelope bounds the real loss at every threshold and never rises with it.
    for lam in (0.1, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 1.0):
        where = simulate_exits(scores, (lam, lam))
        early = where < 2
        wrong = early & ~agree.gather(1, where.clamp(max=1)[:, None]).squeeze(1)
        assert torch.all(wrong <= (got >= lam))


def test_threshold_equals_the_hand_computed_one():
    # 100 samples, target 0.98 -> alpha (n + 1) = 2.02: at most one envelope loss allowed.
    s = torch.tensor([[0.75, 0.25]] * 98 + [[0.5, 0.25], [0.25, 0.875]])
    a = torch.ones(100, 2, dtype=torch.bool)
    a[98, 0] = a[99, 1] = False  # envelope levels 0.5 and 0.875
    res = calibrate_risk_control(s, a, target=0.98)
    # lam = 0.5: two losses (3 > 2.02); lam = 0.75: one (2 <= 2.02).
    assert res.thresholds == (0.75, 0.75)
    assert res.evidence == 100
    assert [d.exiting for d in res.exits] == [98, 1]  # row 99 leaves at exit 1 (0.875), wrongly
    assert res.exits[1].agreement == 0.0 and math.isnan(res.exits[0].lower_bound)
    assert "open (expected)" in res.exits[0].reason
    # 0.025 * 101 = 2.525 < 2 + 1 still keeps 0.75; 0.03 * 101 = 3.03 lets both losses in: the
    # loosest candidate (the smallest best score).
    assert calibrate_risk_control(s, a, target=0.975).thresholds == (0.75, 0.75)
    assert calibrate_risk_control(s, a, target=0.97).thresholds == (0.5, 0.5)


def test_closed_below_the_minimum_evidence_and_open_at_it():
    for n, opens in ((98, False), (99, True)):
        s = torch.linspace(0.1, 0.9, n)[:, None].repeat(1, 2)
        a = torch.ones(n, 2, dtype=torch.bool)
        res = calibrate_risk_control(s, a, target=0.99)
        if opens:  # nothing wrong: the loosest candidate, every sample leaves
            assert res.thresholds == (float(s[0, 0]),) * 2
            assert res.exits[0].exiting == n
        else:
            assert res.thresholds == (INF, INF)
            assert res.exits[0].reason == "closed: 98 evidence samples, 99 needed (expected)"


def test_one_wrong_surest_answer_needs_twice_the_evidence():
    # The surest sample is wrong: no threshold above it has a candidate, so one loss must be
    # allowed, alpha (n + 1) >= 2: n >= 199 at target 0.99.
    for n, opens in ((198, False), (199, True)):
        s = torch.linspace(0.1, 0.9, n)[:, None].repeat(1, 2)
        a = torch.ones(n, 2, dtype=torch.bool)
        a[-1, 0] = False
        res = calibrate_risk_control(s, a, target=0.99)
        assert (res.thresholds[0] < INF) == opens
        if not opens:
            assert res.exits[0].reason.startswith("closed: 1 of 198 evidence samples leave early")


def test_enabled_mask_is_respected():
    s = torch.tensor([[0.875, 0.125, 0.25]] * 50 + [[0.125, 0.9375, 0.375]] * 50)
    a = torch.ones(100, 3, dtype=torch.bool)
    a[:50, 0] = False  # exit 0 is always wrong on the samples it is sure of
    target = 0.9  # at most 9 envelope losses among 100
    res = calibrate_risk_control(s, a, target=target)
    assert res.thresholds == (0.9375, 0.9375, 0.9375)  # exit 0's 50 wrong answers must stay in
    res = calibrate_risk_control(s, a, target=target, enabled=[False, True, True])
    assert res.thresholds == (INF, 0.25, 0.25)  # every sample leaves, none wrongly
    assert res.exits[0].reason == "switched off" and res.exits[0].exiting == 0
    assert res.exits[1].exiting == 50 and res.exits[2].exiting == 50
    res = calibrate_risk_control(s, a, target=target, enabled=[False, False, False])
    assert res.thresholds == (INF, INF, INF)


@pytest.mark.parametrize(
    ("scores", "agree", "kwargs", "match"),
    [
        (torch.rand(10, 2), torch.ones(10, 3, dtype=torch.bool), {}, "both be"),
        (torch.rand(10), torch.ones(10, dtype=torch.bool), {}, "both be"),
        (torch.rand(10, 2), torch.ones(10, 2), {}, "bool"),
        (torch.ones(10, 2, dtype=torch.long), torch.ones(10, 2, dtype=torch.bool), {}, "floating"),
        (torch.rand(10, 2), torch.ones(10, 2, dtype=torch.bool), {"target": 1.0}, "target"),
        (torch.rand(10, 2), torch.ones(10, 2, dtype=torch.bool), {"target": 0.0}, "target"),
        (
            torch.rand(10, 2),
            torch.ones(10, 2, dtype=torch.bool),
            {"enabled": [True]},
            "one True/False per exit",
        ),
    ],
)
def test_bad_inputs_raise_config_errors(scores, agree, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        calibrate_risk_control(scores, agree, **{"target": 0.9, **kwargs})


def test_mean_served_disagreement_stays_within_the_bound():
    # Synthetic heads: agree with probability 0.6 + 0.4 * score. Over many calibrations on fresh
    # draws, the mean disagreement among all served answers must be <= 1 - target.
    target, n, reps = 0.95, 100, 300
    g = torch.Generator().manual_seed(0)

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.rand(m, 2, generator=g)
        return s, torch.rand(m, 2, generator=g) < 0.6 + 0.4 * s

    test_s, test_a = draw(20000)
    risks, opened = [], 0
    for _ in range(reps):
        res = calibrate_risk_control(*draw(n), target=target)
        where = simulate_exits(test_s, res.thresholds)
        wrong = (where < 2) & ~test_a.gather(1, where.clamp(max=1)[:, None]).squeeze(1)
        risks.append(float(wrong.float().mean()))
        opened += res.thresholds[0] < INF
    mean = sum(risks) / reps
    se = torch.tensor(risks).std().item() / math.sqrt(reps)
    assert opened > reps // 2  # the bound is not met by keeping gates shut
    assert mean <= (1 - target) + 3 * se
    # With n = 100 at target 0.95 Learn-then-Test cannot open at all.
    assert calibrate_joint(*draw(n), target=target).thresholds == (INF, INF)


# ------------------------------------------------------------------------------ the config
def test_config_guarantee_is_validated_and_round_trips():
    assert DistillConfig().guarantee == "high_probability"
    cfg = DistillConfig(guarantee="expected")
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["guarantee"] == "expected"
    with pytest.raises(ConfigError, match=r"guarantee must be 'high_probability'.*'expected'"):
        DistillConfig(guarantee="strict")
    with pytest.raises(ConfigError, match="calibration_mode='joint', got 'per_exit'"):
        DistillConfig(guarantee="expected", calibration_mode="per_exit")
    old = DistillConfig().to_dict()
    old.pop("guarantee")  # a config saved before the field existed
    assert DistillConfig.from_dict(old).guarantee == "high_probability"


def test_calibrator_needs_less_evidence_under_the_expected_guarantee():
    eem = toy_wrap()
    strict = PolicyCalibrator(eem, DistillConfig())
    expected = PolicyCalibrator(eem, DistillConfig(guarantee="expected"))
    assert strict.evidence_needed() == min_evidence(0.99, 0.05, 1)
    assert expected.evidence_needed() == 99
    assert expected.closed(50, 0).reports[0]["reason"] == (
        "closed: 50 evidence samples, 99 needed (expected)"
    )


def test_served_disagreement_monitor():
    monitor = DriftMonitor(2, window=200, target=0.99, alpha=1e-3, pooled=True, served=True)
    for k in range(200):
        monitor.record(k % 2, k % 10 != 0)  # 10% of early answers wrong
    with pytest.raises(ValueError, match="exit share"):
        monitor.check()
    assert monitor.check(exit_share=0.01) is None  # at most 1% of traffic can be wrong
    assert monitor.check(exit_share=0.05) is None  # 0.5% served disagreement: in bounds
    alarm = monitor.check(exit_share=0.9)  # 9% served: far above 1%
    assert alarm is not None and (alarm.exit, alarm.n, alarm.failures) == (-1, 200, 20)
    assert "0.900 of traffic leaving early" in alarm.where


# ------------------------------------------------------------------------------ the learner
def _first_open(guarantee: str) -> tuple[OnlineDistiller, int | None]:
    config = quick(
        target_agreement=0.99,
        confidence=0.95,
        warmup_samples=128,
        recalibrate_every=128,
        guarantee=guarantee,
    )
    learner = OnlineDistiller(toy_wrap(), config)
    g = torch.Generator().manual_seed(21)
    for _ in range(40):
        run(learner, 1, g)
        if learner.stats()["first_open_sample"] is not None:
            break
    return learner, learner.stats()["first_open_sample"]


def test_expected_guarantee_opens_gates_with_less_evidence(tmp_path):
    strict, strict_first = _first_open("high_probability")
    expected, expected_first = _first_open("expected")
    assert expected_first is not None and strict_first is not None
    assert expected_first < strict_first
    stats = expected.stats()
    assert stats["guarantee"] == "expected" and strict.stats()["guarantee"] == "high_probability"
    assert any(t < INF for t in stats["thresholds"])
    assert any("(expected)" in e["reason"] for e in stats["exits"])
    # Saved and resumed: same guarantee, same first opening.
    path = tmp_path / "l.safetensors"
    expected.save(path)
    resumed = OnlineDistiller.load(Toy().eval(), path)
    assert resumed.config.guarantee == "expected"
    assert resumed.stats()["first_open_sample"] == expected_first
    assert resumed.drift.served


def test_learner_saved_before_the_field_loads_as_high_probability(tmp_path):
    learner = OnlineDistiller(toy_wrap(), quick())
    run(learner, 8, torch.Generator().manual_seed(14))
    assert learner.stats()["first_open_sample"] is not None
    tensors, state = learner.state_dict()
    state["config"].pop("guarantee")
    state["counters"].pop("first_open_sample")
    path = tmp_path / "old.safetensors"
    save_early_exit_model(learner.eem, path, extra_tensors=tensors, extra_config={"distill": state})
    resumed = OnlineDistiller.load(Toy().eval(), path)
    assert resumed.config.guarantee == "high_probability"
    assert resumed.stats()["first_open_sample"] is None  # not known for such a file
    assert resumed.eem.thresholds == learner.eem.thresholds
    assert not resumed.drift.served


def test_served_disagreement_alarm_closes_gates_after_a_shift():
    # As test_distill's drift test, under the expected guarantee: after the shift the first exit
    # is surely wrong and most traffic leaves there, so served disagreement is far above 1%.
    from test_distill import _drifted

    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick(audit_rate=0.2, guarantee="expected"))
    g = torch.Generator().manual_seed(17)
    run(learner, 12, g)
    assert eem.thresholds[0] < INF
    learner.config.recalibrate_every = 10**9  # only the monitor can react now
    for _ in range(30):
        learner.step(_drifted(64, g))
        if learner.stats()["drift_alarms"]:
            break
    stats = learner.stats()
    assert stats["drift_alarms"] == 1 and stats["phase"].startswith("drift")
    assert "so served disagreement is above 0.05" in stats["phase"]
    assert all(t == INF for t in eem.thresholds) and stats["evidence"] == 0


def test_empirical_threshold_among_all_answers_is_looser():
    s = torch.tensor([[0.75, 0.125], [0.5, 0.875], [0.25, 0.375], [0.0625, 0.0625]])
    a = torch.tensor([[True, True], [False, True], [False, True], [True, True]])
    from earlyexit.calibration import empirical_joint_thresholds

    # At 0.375 rows 0-2 leave, row 1 wrongly (exit 0 at 0.5): 1 of 3 early answers (> 30%), but
    # 1 of all 4 answers (<= 30%). At 0.0625 row 2 leaves wrongly too: 2 of 4. At 0.75 none is
    # wrong. So among early answers 0.75, among all answers 0.375.
    assert empirical_joint_thresholds(s, a, 0.7) == (0.75, 0.75)
    assert empirical_joint_thresholds(s, a, 0.7, among="all") == (0.375, 0.375)
    with pytest.raises(ConfigError, match="among must be 'early' or 'all'"):
        empirical_joint_thresholds(s, a, 0.7, among="served")
