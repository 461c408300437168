"""Online self-distillation: learning from served traffic, calibrated gates, drift, persistence.

Most tests use ``Toy``, a tiny classifier whose behaviour is known exactly, so they can check the
statistics (gates, audit rate, drift) in well under a second per thousand samples.
"""

from __future__ import annotations

import json
import math
import os
import threading

import pytest
import torch
from conftest import FAMILIES, batch
from torch import nn

import earlyexit as ee
from earlyexit.distill import BackgroundTrainingError, DistillConfig, OnlineDistiller
from earlyexit.distill import trainer as trainer_module
from earlyexit.distill.drift import DriftMonitor, drift_pvalue
from earlyexit.distill.evidence import ContentSplit, Evidence
from earlyexit.distill.gate_data import GateData
from earlyexit.distill.schedule import Phase, PhaseStatus
from earlyexit.distill.trainer import HeadTrainer, classify_all
from earlyexit.errors import CheckpointError, ConfigError, InputError
from earlyexit.routing import gates_open, heads_evaluated


class LeftHalf(nn.Module):
    """Zeroes the right half of a map (a parameter-free stage)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(h[:1, :1, :1])
        mask[..., h.shape[-1] // 2 :] = 0
        return h * mask


class Toy(nn.Module):
    """Final answer: argmax of the left half's channel means (x10).

    Exit ``stage1`` sees the whole image, exit ``stage2`` only the left half (so its head can
    agree perfectly); ``mid`` is an expensive conv that computes the identity. With
    ``expensive_first`` the conv runs before ``stage2``, so leaving at ``stage2`` saves nothing.
    """

    def __init__(self, width: int = 32, expensive_first: bool = False) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        self.stage2 = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), LeftHalf())  # a cheap conv
        self.mid = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.Conv2d(width, 3, 1))
        self.expensive_first = expensive_first
        with torch.no_grad():
            for conv in (self.stage1[0], self.stage2[0], self.mid[0], self.mid[1]):
                conv.weight.zero_()
                conv.bias.zero_()
            for c in range(3):
                self.stage1[0].weight[c, c] = 1.0
                self.stage2[0].weight[c, c, 1, 1] = 1.0
                self.mid[0].weight[c, c, 1, 1] = 1.0
                self.mid[1].weight[c, c] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stage1(x)
        h = self.stage2(self.mid(h)) if self.expensive_first else self.mid(self.stage2(h))
        return 10 * h[..., : h.shape[-1] // 2].mean(dim=(2, 3))


def toy_wrap(device: str | torch.device = "cpu", **kwargs) -> ee.EarlyExitModel:
    torch.manual_seed(0)
    model = Toy(**kwargs).eval().to(device)
    return ee.wrap(model, exits=["stage1", "stage2"], input_size=(3, 8, 8))


def stream(n: int, g: torch.Generator, same_halves: float = 1.0, right_scale: float = 1.0):
    """Left half shows class k; the right half shows k too with probability ``same_halves``,
    else another class, ``right_scale`` times brighter (a drift makes the whole image lie)."""
    k = torch.randint(3, (n,), generator=g)
    other = (k + torch.randint(1, 3, (n,), generator=g)) % 3
    right = torch.where(torch.rand(n, generator=g) < same_halves, k, other)

    def half(cls: torch.Tensor, scale: float) -> torch.Tensor:
        base = torch.rand(n, 3, 1, 1, generator=g) * 0.3
        base[torch.arange(n), cls] += 1.0
        return (scale * base).expand(n, 3, 8, 4)

    x = torch.cat([half(k, 1.0), half(right, right_scale)], dim=3)
    return x + 0.05 * torch.randn(n, 3, 8, 8, generator=g)


def quick(**kwargs) -> DistillConfig:
    """A config that opens gates after a few hundred samples (target 0.95 at 90%)."""
    base = dict(
        target_agreement=0.95,
        confidence=0.9,
        warmup_samples=256,
        recalibrate_every=256,
        lr=2e-2,
        seed=0,
        train_time_budget=None,  # deterministic: training never depends on wall-clock
    )
    base.update(kwargs)
    return DistillConfig(**base)


def run(learner: OnlineDistiller, steps: int, g: torch.Generator, n: int = 64, **stream_kw):
    for _ in range(steps):
        learner.step(stream(n, g, **stream_kw))


def served_agreement(eem: ee.EarlyExitModel, x: torch.Tensor) -> tuple[float, float]:
    """(agreement with the full model among early exits, exit rate) on fresh traffic."""
    res = eem.predict(x)
    full = eem.base_model(x).argmax(dim=-1)
    early = res.exit_index < eem.num_exits
    if not early.any():
        return math.nan, 0.0
    agree = (res.logits.argmax(dim=-1) == full)[early].float().mean().item()
    return agree, early.float().mean().item()


def snapshot(learner: OnlineDistiller) -> tuple[dict[str, torch.Tensor], str, tuple, dict]:
    tensors, state = learner.state_dict()
    # Wall-clock (and the learning time it earns): the only non-reproducible state.
    for key in ("serve_seconds", "learn_seconds", "allowance_seconds"):
        state["counters"].pop(key)
    heads = {k: v.clone() for k, v in learner.eem.heads.state_dict().items()}
    # The served gate (learned weights included) is part of what must survive a save.
    return tensors, repr(state) + repr(learner.eem.gate.config()), learner.eem.thresholds, heads


def assert_same(a, b) -> None:
    ta, ea, tha, ha = a
    tb, eb, thb, hb = b
    assert ea == eb and tha == thb
    assert ta.keys() == tb.keys() and ha.keys() == hb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    for key in ha:
        assert torch.equal(ha[key], hb[key]), key


# ---------------------------------------------------------------------------------------- config
def test_config_validates_and_round_trips_json():
    cfg = DistillConfig(target_agreement=0.98, storage_dtype="float16")
    assert DistillConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in (
        dict(target_agreement=1.0),
        dict(audit_rate=-0.1),
        dict(batch_size=0),
        dict(storage_dtype="int8"),
        dict(calibration_method="bonferroni"),
        dict(lr=float("nan")),
        dict(background="yes"),
        dict(gate="agreement"),
        dict(gate_samples=0),
        dict(audit_boost=1.5),
        dict(evidence_target=-1),
    ):
        with pytest.raises(ConfigError):
            DistillConfig(**bad)
    with pytest.raises(ConfigError, match="unknown"):
        DistillConfig.from_dict({"target_agreement": 0.9, "typo": 1})


# ---------------------------------------------------------------------------------------- learning
def test_warmup_trains_heads_to_agree_with_the_teacher():
    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick(warmup_samples=10**6))  # learn only, never calibrate
    g = torch.Generator().manual_seed(0)
    x = stream(400, torch.Generator().manual_seed(99))
    run(learner, 30, g)
    assert all(t == math.inf for t in eem.thresholds)  # no calibration: gates stay closed
    _res, trace = eem.trace(x)
    full = trace.final_logits.argmax(dim=-1)
    # Exit 2 sees exactly what decides the answer; exit 1 sees both halves (same class here).
    for i, record in enumerate(trace.exits):
        student = learner.trainer.student[i].classify(record.z)
        assert (student.argmax(dim=-1) == full).float().mean() > 0.97, i
    stats = learner.stats()
    assert stats["train_steps"] > 0 and stats["loss"] < 1.0
    assert stats["samples"] == 30 * 64


def test_gates_stay_closed_until_evidence_suffices_then_open():
    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick(warmup_samples=0, recalibrate_every=64))
    g = torch.Generator().manual_seed(1)
    run(learner, 1, g)  # 64 samples, ~26 held out: fewer than the 59 a 0.95 gate needs at 90%
    stats = learner.stats()
    assert stats["calibrations"] == 1
    assert all(t == math.inf for t in eem.thresholds)
    assert "needed" in stats["exits"][0]["reason"]
    run(learner, 10, g)
    assert any(t < math.inf for t in eem.thresholds)
    assert learner.stats()["phase"] == "serving"


def test_agreement_guarantee_holds_on_held_out_stream():
    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick())
    g = torch.Generator().manual_seed(2)
    run(learner, 40, g, same_halves=0.6)
    fresh = stream(3000, torch.Generator().manual_seed(123), same_halves=0.6)
    agree, rate = served_agreement(eem, fresh)
    assert rate > 0.5  # exits are used ...
    assert agree >= 0.95  # ... and agree with the full model at the target
    stats = learner.stats()
    assert stats["mac_saving"] > 0.3 and stats["expected_mac_saving"] > 0.3


def test_audit_fraction_is_respected():
    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick(audit_rate=0.2, audit_boost=0.0))
    g = torch.Generator().manual_seed(3)
    run(learner, 15, g)
    assert any(t < math.inf for t in eem.thresholds)
    before = learner.stats()["exits"]
    audited0 = sum(e["audited_total"] for e in before)
    exits0 = sum(learner.traffic.exits[: eem.num_exits])
    run(learner, 30, g)
    after = learner.stats()["exits"]
    audited = sum(e["audited_total"] for e in after) - audited0
    exited = sum(learner.traffic.exits[: eem.num_exits]) - exits0
    assert exited > 500
    sd = math.sqrt(exited * 0.2 * 0.8)
    assert abs(audited - 0.2 * exited) < 4 * sd


def test_audit_boost_tapers_to_audit_rate_as_evidence_fills():
    eem = toy_wrap()
    cfg = quick(audit_rate=0.05, audit_boost=0.45, evidence_target=600)
    learner = OnlineDistiller(eem, cfg)
    g = torch.Generator().manual_seed(3)
    run(learner, 15, g)
    assert any(t < math.inf for t in eem.thresholds)
    have = len(learner.evidence)
    assert have < 600
    assert learner.evidence.audit_share() == pytest.approx(0.05 + 0.40 * (1 - have / 600))
    # While evidence is short, early exits really are audited at about the boosted share.
    audited0, exits0 = sum(learner.traffic.audited), sum(learner.traffic.exits[:2])
    run(learner, 5, g)
    audited = sum(learner.traffic.audited) - audited0
    exited = sum(learner.traffic.exits[:2]) - exits0
    assert audited > 0.15 * exited
    for _ in range(200):  # until the evidence reaches the target ...
        if len(learner.evidence) >= 600:
            break
        run(learner, 1, g)
    assert learner.evidence.audit_share() == pytest.approx(0.05)  # ... then back to audit_rate
    off = OnlineDistiller(toy_wrap(), quick(audit_rate=0.05, evidence_target=0))
    assert off.evidence.audit_share() == pytest.approx(0.05)


def test_audits_are_drawn_among_held_out_contents_only():
    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick(audit_rate=0.2))
    g = torch.Generator().manual_seed(3)
    run(learner, 15, g)
    assert any(t < math.inf for t in eem.thresholds)
    for _ in range(10):
        x = stream(64, g)
        held_out = learner.split.is_calibration(x)
        audited_before = list(learner.traffic.audited)
        evidence_before = learner.evidence.ring.added
        res = learner.step(x)
        early = res.exit_index < eem.num_exits
        audited = sum(learner.traffic.audited) - sum(audited_before)
        # Every audited early exit is held out, so it (and every held-out sample that ran to the
        # end because it was audited) became evidence; nothing else did.
        assert learner.evidence.ring.added - evidence_before >= audited
        assert audited <= int((early & held_out).sum())


def test_learned_gate_is_fitted_and_served_with_the_heads():
    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick())
    g = torch.Generator().manual_seed(2)
    run(learner, 40, g, same_halves=0.6)
    gate = eem.gate
    assert isinstance(gate, ee.LearnedGate) and gate.fitted and gate.needs_history
    stats = learner.stats()
    assert stats["gate"] == repr(gate)
    assert "learned gate fitted on" in stats["exits"][0]["gate"]
    # Served confidences are that gate's scores of those heads (log-odds of agreement).
    x = stream(256, torch.Generator().manual_seed(5), same_halves=0.6)
    _res, trace = eem.trace(x, audit=torch.ones(256, dtype=torch.bool))  # every head sees all
    history = []
    for i, record in enumerate(trace.exits):
        want = gate.score(record.logits, ee.GateContext(i, record.rows, list(history)))
        assert torch.allclose(record.scores, want)
        history.append(record.logits)
    # And the learned policy still meets the target on fresh traffic.
    agree, rate = served_agreement(eem, stream(3000, torch.Generator().manual_seed(9), 0.6))
    assert rate > 0.5 and agree >= 0.95


def test_gate_data_is_recorded_before_rows_can_teach():
    learner = OnlineDistiller(toy_wrap(), quick(warmup_samples=10**6))  # learn only
    g = torch.Generator().manual_seed(4)
    for _ in range(30):
        learner.step(stream(64, g))
        # Every row in replay had the student's view of it recorded first; rows still pending
        # (recorded later, in one block) are not in replay, so no training step has seen them.
        assert learner.gate_data.ring.added == learner.trainer.replay.added
        assert learner.trainer.trained_samples == learner.trainer.replay.added
    assert learner.gate_data.pending_rows > 0  # blocks grow once replay holds a few hundred rows
    learner.calibrate()  # a calibration records and releases whatever is pending
    assert learner.gate_data.pending_rows == 0
    assert learner.gate_data.ring.added == learner.trainer.replay.added


def test_a_gate_that_cannot_be_fitted_falls_back_instead_of_failing_serving():
    learner = OnlineDistiller(toy_wrap(), quick())
    g = torch.Generator().manual_seed(2)
    run(learner, 10, g)
    learner.gate_data.ring.data["features"][0, 0, 0] = float("nan")  # a poisoned record
    gate, note = GateData.fit(learner.gate_data.snapshot())
    assert not gate.fitted and "not fitted" in note and "NaN" in note
    run(learner, 5, g)  # serving and calibration go on


@pytest.mark.parametrize("choice", ["fixed", "wrap"])  # "wrap": the older spelling
def test_gate_fixed_keeps_the_wrappers_gate(choice):
    eem = ee.wrap(Toy().eval(), exits=["stage1", "stage2"], input_size=(3, 8, 8), gate="margin")
    learner = OnlineDistiller(eem, quick(gate=choice))
    assert learner.config.gate == "fixed"
    run(learner, 20, torch.Generator().manual_seed(2))
    assert any(t < math.inf for t in eem.thresholds)
    assert type(eem.gate).__name__ == "MarginGate"
    assert learner.gate_data.ring is None  # nothing recorded for a gate that is not learned


def test_base_model_bit_identical_and_mode_kept():
    eem = toy_wrap()
    model = eem.base_model
    bn = model.stage1[1]
    bn.running_mean.fill_(0.0)
    bn.running_var.fill_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    learner = OnlineDistiller(eem, quick())
    run(learner, 12, torch.Generator().manual_seed(4))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_real_family_learns_without_touching_batchnorm():
    builder, _size = FAMILIES["timm.resnet-d"]
    torch.manual_seed(0)
    model = builder().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eem = ee.wrap(model, input_size=(3, 32, 32))
    learner = OnlineDistiller(eem, quick(batch_size=16))
    for seed in range(3):
        res = learner.step(batch((3, 32, 32), n=8, seed=seed))
        assert res.logits.shape == (8, 10)
    assert learner.stats()["train_steps"] > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training


def test_replay_and_evidence_memory_is_bounded():
    eem = toy_wrap()
    cap = 8_000
    learner = OnlineDistiller(
        eem, quick(replay_samples=5000, evidence_samples=5000, max_memory_bytes=cap)
    )
    g = torch.Generator().manual_seed(5)
    run(learner, 3, g)
    first = learner.stats()["memory_bytes"]
    assert 0 < first <= cap
    run(learner, 40, g)
    stats = learner.stats()
    assert stats["memory_bytes"] == first
    assert stats["replay"] <= learner.trainer.replay.capacity < 5000
    assert learner.trainer.replay.added > learner.trainer.replay.capacity  # it wrapped around
    assert len(learner.traffic.recent) < 100


def test_evidence_snapshot_reuses_one_buffer():
    # A fresh clone per calibration, larger each time, is what the allocator kept (RSS grew
    # without a plateau behind Ray Serve): every snapshot goes into the same memory.
    evidence = Evidence(quick())
    evidence.build({"z0": ((2,), torch.float32)}, capacity=4, device=torch.device("cpu"))
    evidence.add([torch.zeros(3, 2)], torch.tensor([0, 1, 2]))
    first = evidence.snapshot()
    assert first["z0"].shape == (3, 2) and first["teacher"].tolist() == [0, 1, 2]
    evidence.add([torch.ones(3, 2)], torch.tensor([3, 4, 5]))  # wraps: 4 rows kept
    second = evidence.snapshot()
    assert second["z0"].data_ptr() == first["z0"].data_ptr()
    assert torch.equal(second["z0"], evidence.ring.view()["z0"])
    assert second["teacher"].tolist() == [4, 5, 2, 3]


def test_classify_all_in_blocks_gives_the_logits_of_one_call(monkeypatch):
    eem = toy_wrap()
    x = stream(10, torch.Generator().manual_seed(3))
    _, trace = eem.trace(x, audit=torch.ones(10, dtype=torch.bool))
    zs = [record.z for record in trace.exits]
    with torch.no_grad():
        whole = [head.classify(z) for head, z in zip(eem.heads, zs, strict=True)]
    monkeypatch.setattr(trainer_module, "CLASSIFY_BLOCK", 3)  # 3 + 3 + 3 + 1 rows
    for got, want in zip(classify_all(eem.heads, zs), whole, strict=True):
        torch.testing.assert_close(got, want)


def test_fit_on_a_finite_loader():
    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick())
    g = torch.Generator().manual_seed(6)
    data = [(stream(64, g), torch.zeros(64)) for _ in range(12)]
    stats = learner.fit(data, epochs=2)
    assert stats["samples"] == 2 * 12 * 64
    assert any(t < math.inf for t in eem.thresholds)
    with pytest.raises(ConfigError):
        learner.fit(data, epochs=0)


# ---------------------------------------------------------------------------------------- drift
def _drifted(n: int, g: torch.Generator) -> torch.Tensor:
    """After the shift the right half lies, brightly: the whole-image exit becomes surely wrong."""
    return stream(n, g, same_halves=0.0, right_scale=3.0)


@pytest.mark.slow
def test_drift_closes_the_lying_gate_and_reopens_on_new_evidence():
    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick(audit_rate=0.1))
    g = torch.Generator().manual_seed(7)
    run(learner, 20, g)  # halves agree: the whole-image exit is right and sure
    assert eem.thresholds[0] < math.inf
    assert learner.stats()["exit_rates"][0] > 0.5
    first_closed = None
    for i in range(40):
        learner.step(_drifted(64, g))
        if first_closed is None and eem.thresholds[0] == math.inf:
            first_closed = i
    assert first_closed is not None and first_closed < 15  # closed by itself, soon
    assert eem.thresholds[1] < math.inf  # the exit that still agrees opened on the new evidence
    fresh = _drifted(3000, torch.Generator().manual_seed(321))
    agree, rate = served_agreement(eem, fresh)
    assert rate > 0.3 and agree >= 0.95


def test_drift_monitor_closes_gates_between_calibrations():
    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick(audit_rate=0.2))
    g = torch.Generator().manual_seed(17)
    run(learner, 12, g)
    assert eem.thresholds[0] < math.inf
    learner.config.recalibrate_every = 10**9  # only the monitor can react now
    for _ in range(30):
        learner.step(_drifted(64, g))
        if learner.stats()["drift_alarms"]:
            break
    stats = learner.stats()
    assert stats["drift_alarms"] == 1 and stats["phase"].startswith("drift")
    assert all(t == math.inf for t in eem.thresholds)
    assert stats["evidence"] == 0  # pre-shift evidence is void
    run_drifted = [learner.step(_drifted(64, g)) for _ in range(6)]
    assert all((r.exit_index == eem.num_exits).all() for r in run_drifted)  # closed: all audited
    learner.calibrate()  # enough post-shift evidence: the still-faithful exit reopens
    assert eem.thresholds[1] < math.inf


# ---------------------------------------------------------------------------------------- switch-off
def test_an_exit_that_costs_more_than_it_saves_is_switched_off():
    eem = toy_wrap(expensive_first=True)  # stage2 sits after the expensive conv: saves nothing
    learner = OnlineDistiller(eem, quick())
    # Long enough that exit 0 alone has the evidence to open (joint tests pool evidence: with too
    # little, keeping the useless exit open is what lets exit 0 open at all).
    run(learner, 60, torch.Generator().manual_seed(8), same_halves=0.3)
    stats = learner.stats()
    late = stats["exits"][1]
    assert late["state"] == "switched off" and "costs" in late["reason"]
    assert eem.thresholds[1] == math.inf
    # Its head no longer runs when serving.
    assert heads_evaluated(gates_open(eem.thresholds), eem.gate.needs_history)[1] is False

    eem2 = toy_wrap(expensive_first=False)  # the same exit before the conv pays for itself
    learner2 = OnlineDistiller(eem2, quick())
    run(learner2, 20, torch.Generator().manual_seed(8), same_halves=0.3)
    assert learner2.stats()["exits"][1]["state"] == "open"


def test_exits_are_chosen_on_rows_the_threshold_test_never_sees():
    # Choosing among exit sets on the rows that then test the thresholds would spend the
    # confidence level once per set: every 4th evidence row chooses, the other rows test, once.
    eem = toy_wrap(expensive_first=True)
    learner = OnlineDistiller(eem, quick())
    run(learner, 30, torch.Generator().manual_seed(8), same_halves=0.3)
    stats = learner.calibrate()
    n = stats["evidence"]
    assert stats["exits"][0]["evidence_reached"] == n - math.ceil(n / 4)

    eem2 = toy_wrap(expensive_first=True)
    learner2 = OnlineDistiller(eem2, quick(auto_switch_off=False))
    run(learner2, 30, torch.Generator().manual_seed(8), same_halves=0.3)
    stats2 = learner2.calibrate()
    assert stats2["exits"][0]["evidence_reached"] == stats2["evidence"]  # nothing to choose
    assert all(e["state"] != "switched off" for e in stats2["exits"])


def test_empirical_joint_thresholds_pick_the_most_lenient_threshold_meeting_the_target():
    from earlyexit.calibration import empirical_joint_thresholds

    scores = torch.tensor([[0.75, 0.125], [0.5, 0.875], [0.25, 0.375]])
    agree = torch.tensor([[True, True], [False, True], [False, True]])
    assert empirical_joint_thresholds(scores, agree, 0.9) == (0.75, 0.75)
    assert empirical_joint_thresholds(scores, agree, 0.6) == (0.375, 0.375)  # 2 of 3 right
    assert empirical_joint_thresholds(scores, agree, 0.9, enabled=[False, True]) == (
        math.inf,
        0.125,
    )
    never = torch.zeros_like(agree)
    assert empirical_joint_thresholds(scores, never, 0.5) == (math.inf, math.inf)
    with pytest.raises(ConfigError, match=r"\[N, E\]"):
        empirical_joint_thresholds(scores, agree[:, :1], 0.9)


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.new_full(x.shape, float("nan")),
        lambda x: torch.where(torch.rand_like(x) < 0.01, float("inf"), x),
        lambda x: x[:0],
        lambda x: x[:, :2],
        lambda x: x[0],
        lambda x: x.double(),
        lambda x: (x * 100).long(),
    ],
    ids=["nan", "inf", "empty", "channels", "rank", "dtype", "int"],
)
def test_step_rejects_bad_input_without_changing_state(make):
    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick())
    g = torch.Generator().manual_seed(9)
    run(learner, 8, g)
    before = snapshot(learner)
    with pytest.raises(InputError):
        learner.step(make(stream(16, g)))
    assert_same(before, snapshot(learner))


def test_base_model_in_training_mode_is_rejected():
    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick())
    eem.base_model.train()
    try:
        with pytest.raises(InputError, match="training mode"):
            learner.step(stream(8, torch.Generator().manual_seed(0)))
    finally:
        eem.base_model.eval()


# ---------------------------------------------------------------------------------------- background
def test_background_mode_hammered_by_serving_threads():
    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick(background=True, recalibrate_every=128))
    installed: list[tuple[nn.ModuleList, dict[str, torch.Tensor]]] = []
    make_candidate = learner.calibrator.candidate

    def recording_candidate(*args, **kwargs):  # every calibrated candidate (a superset of those
        candidate = make_candidate(*args, **kwargs)  # published)
        installed.append(
            (candidate.heads, {k: v.clone() for k, v in candidate.heads.state_dict().items()})
        )
        return candidate

    learner.calibrator.candidate = recording_candidate
    student_ptrs = {p.data_ptr() for p in learner.trainer.student.parameters()}
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        g = torch.Generator().manual_seed(11)
        try:
            while not stop.is_set():
                heads = eem.heads
                assert not ({p.data_ptr() for p in heads.parameters()} & student_ptrs)
                res = eem.predict(stream(32, g))
                assert torch.isfinite(res.logits).all()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        g = torch.Generator().manual_seed(10)
        for _ in range(40):
            res = learner.step(stream(64, g))
            assert res.logits.shape == (64, 3)
        learner.sync(timeout=60)
    finally:
        stop.set()
        thread.join()
        learner.close()
    assert not errors, errors
    assert learner.stats()["train_steps"] > 0
    assert len(installed) >= 2 and any(t < math.inf for t in eem.thresholds)
    # A published head list is never trained again: what was served is what was calibrated.
    for heads, state in installed:
        for key, value in heads.state_dict().items():
            assert torch.equal(value, state[key])


def test_background_exception_surfaces_on_next_step():
    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick(background=True))

    def broken() -> None:
        raise RuntimeError("disk on fire")

    learner.trainer.train_step = broken
    g = torch.Generator().manual_seed(12)
    try:
        with pytest.raises(BackgroundTrainingError, match="disk on fire"):
            for _ in range(200):
                learner.step(stream(64, g))
                learner.worker.join(timeout=0.05)
    finally:
        learner.close()


# ---------------------------------------------------------------------------------------- persistence
def test_save_resume_continues_exactly(tmp_path):
    g_data = torch.Generator().manual_seed(13)
    batches = [stream(64, g_data, same_halves=0.6) for _ in range(16)]

    straight = OnlineDistiller(toy_wrap(), quick())
    expected = [straight.step(x) for x in batches]

    first = OnlineDistiller(toy_wrap(), quick())
    for x in batches[:8]:
        first.step(x)
    path = tmp_path / "learner.safetensors"
    first.save(path)
    resumed = OnlineDistiller.load(Toy().eval(), path)  # fresh base model, same weights
    mid_state = snapshot(first)
    assert_same(mid_state, snapshot(resumed))
    results = [resumed.step(x) for x in batches[8:]]
    assert_same(snapshot(straight), snapshot(resumed))
    # Same thresholds and the same stats, figure for figure, as a learner that never stopped.
    assert resumed.eem.thresholds == straight.eem.thresholds
    # (but the wall-clock share of learning, the one figure that depends on the machine).
    a, b = resumed.stats(), straight.stats()
    for stats in (a, b):
        stats["learning_cost"].pop("seconds_ratio_total")
    assert json.dumps(a) == json.dumps(b)
    for got, want in zip(results, expected[8:], strict=True):  # served answers identical too
        assert torch.equal(got.exit_index, want.exit_index)
        assert torch.equal(got.logits, want.logits)

    # The same file is a plain EarlyExitModel checkpoint too.
    eem = ee.load(Toy().eval(), path)
    assert eem.thresholds == mid_state[2]


def test_resume_onto_an_existing_wrapper(tmp_path):
    learner = OnlineDistiller(toy_wrap(), quick())
    run(learner, 8, torch.Generator().manual_seed(14))
    path = tmp_path / "l.safetensors"
    learner.save(path)
    eem = toy_wrap()
    resumed = OnlineDistiller.load(eem, path)
    assert resumed.eem is eem and eem.thresholds == learner.eem.thresholds
    assert eem.gate.config() == learner.eem.gate.config()
    assert_same(snapshot(learner), snapshot(resumed))


def test_load_errors_are_clear(tmp_path):
    learner = OnlineDistiller(toy_wrap(), quick())
    run(learner, 4, torch.Generator().manual_seed(15))
    path = tmp_path / "l.safetensors"
    learner.save(path)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        OnlineDistiller.load(Toy().eval(), truncated)

    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        OnlineDistiller.load(Toy().eval(), foreign)

    plain = tmp_path / "plain.safetensors"
    learner.eem.save(plain)
    with pytest.raises(CheckpointError, match="no learner state"):
        OnlineDistiller.load(Toy().eval(), plain)

    other = Toy().eval()
    with torch.no_grad():
        other.mid[0].weight.add_(0.01)
    with pytest.raises(CheckpointError, match="different"):
        OnlineDistiller.load(other, path)
    with pytest.raises(CheckpointError, match="different"):
        OnlineDistiller.load(ee.wrap(other, exits=["stage1", "stage2"], input_size=(3, 8, 8)), path)


def test_interrupted_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    learner = OnlineDistiller(toy_wrap(), quick())
    g = torch.Generator().manual_seed(16)
    run(learner, 4, g)
    path = tmp_path / "l.safetensors"
    learner.save(path)
    good = path.read_bytes()
    run(learner, 4, g)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        learner.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["l.safetensors"]  # no temp file left
    OnlineDistiller.load(Toy().eval(), path)


def test_state_keeps_the_version_1_layout():
    # Files saved before the learner was split into parts must keep loading: same record keys,
    # same counters, same tensor names.
    learner = OnlineDistiller(toy_wrap(), quick())
    run(learner, 8, torch.Generator().manual_seed(18))
    tensors, state = learner.state_dict()
    assert list(state) == [
        "version",
        "config",
        "counters",
        "credit",
        "param_groups",
        "rings",
        "reports",
        "expected_mac_saving",
        "phase",
        "last_loss",
        "recent",  # new, optional: version 1 readers ignore it
        "dormant",  # new, optional: older files read no dormant head
        "off_streak",
    ]
    assert state["version"] == 1
    assert list(state["counters"]) == [
        "samples",
        "exits",
        "exits_since_publish",
        "samples_since_publish",
        "audited",
        "audited_agree",
        "audited_since_publish",
        "audited_agree_since_publish",
        "macs",
        "macs_since_publish",
        "train_steps",
        "trained_samples",
        "calibrations",
        "last_calibration",
        "drift_alarms",
        "serve_seconds",
        "learn_seconds",
        "epoch",
        "non_finite_dropped",  # new, optional: older files lack it (read as 0)
        "allowance_seconds",  # new, optional: older files lack it (budget x serving time)
        "first_open_sample",  # new, optional: older files lack it (read as None)
        # new, optional: the learning schedule and its cost (older files: warm-up ratio, 0)
        "taper",
        "best_loss",
        "window_loss",
        "window_rows",
        "train_macs",
        "calibration_macs",
        "cost_block",
        "cost_last_block",
        "allowance_macs",  # new, optional: older files lack it (what was learned, none owed)
        "scored",  # new, optional: older files count the next calibration's rows in full
    ]
    assert list(state["rings"]) == ["replay", "evidence", "gate_data"]
    prefixes = {key.split(".")[0] for key in tensors}
    assert prefixes <= {
        "student",
        "opt",
        "rng",
        "replay",
        "evidence",
        "gate_data",
        "monitor",
        "pending",
    }
    assert {"rng.audit", "rng.train", "monitor.0", "monitor.1"} <= set(tensors)
    # JSON keeps plain strings for states and phase.
    record = json.loads(json.dumps(state))
    assert {r["state"] for r in record["reports"]} <= {"open", "closed", "switched off"}
    assert record["phase"] == learner.stats()["phase"]


# ---------------------------------------------------------------------------------------- parts
def test_content_split_is_deterministic_per_content():
    split = ContentSplit(seed=0, calibration_fraction=0.4)
    x = torch.rand(2000, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    side = split.is_calibration(x)
    # The same content lands on the same side whatever batch it comes in, in any order.
    order = torch.randperm(2000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(split.is_calibration(x[order]), side[order])
    assert torch.equal(split.is_calibration(x[:7].clone()), side[:7])
    assert torch.equal(ContentSplit(0, 0.4).is_calibration(x), side)  # a pure function of the seed
    assert abs(side.float().mean().item() - 0.4) < 0.05
    assert not torch.equal(ContentSplit(1, 0.4).is_calibration(x), side)
    # Other channel counts are folded onto three hash channels.
    assert split.is_calibration(torch.rand(4, 1, 8, 8)).shape == (4,)


def test_drift_pvalue_is_the_binomial_upper_tail():
    scipy_stats = pytest.importorskip("scipy.stats")
    for target in (0.9, 0.95, 0.99, 0.999):
        for n in (1, 2, 17, 100, 400):
            for failures in range(1, n + 1, max(1, n // 25)):
                want = float(scipy_stats.binom.sf(failures - 1, n, 1.0 - target))
                assert drift_pvalue(n, failures, target) == want, (target, n, failures)


@pytest.mark.parametrize("pooled", [False, True])
def test_drift_monitor_alarms_exactly_when_the_binomial_test_says(pooled):
    scipy_stats = pytest.importorskip("scipy.stats")
    target, alpha, n = 0.95, 1e-3, 200
    for failures in range(0, 40):
        monitor = DriftMonitor(2, window=n, target=target, alpha=alpha, pooled=pooled)
        for i in range(n):
            monitor.record(1, i >= failures)
        alarm = monitor.check()
        significant = failures > 0 and scipy_stats.binom.sf(failures - 1, n, 1 - target) < alpha
        assert (alarm is not None) == significant, failures
        if alarm is not None:
            assert alarm == type(alarm)(-1 if pooled else 1, n, failures)
    # The window forgets: only the latest ``window`` audits count.
    monitor = DriftMonitor(1, window=50, target=target, alpha=alpha, pooled=False)
    for ok in [False] * 50 + [True] * 50:
        monitor.record(0, ok)
    assert monitor.counts(0) == (50, 50) and monitor.check() is None
    tensors, state = monitor.state_dict()
    other = DriftMonitor(1, window=50, target=target, alpha=alpha, pooled=False)
    other.load_state_dict(tensors, state)
    assert other.counts(0) == (50, 50) and list(other.windows[0]) == list(monitor.windows[0])


def test_trainer_state_round_trips_and_continues_identically():
    import threading as th

    eem = toy_wrap()
    cfg = quick(batch_size=16)
    locks = (th.RLock(), th.RLock())
    trainer = HeadTrainer(eem.heads, cfg, *locks)
    g = torch.Generator().manual_seed(19)
    zs = [torch.randn(200, 3, generator=g), torch.randn(200, 3, generator=g)]
    teacher = torch.randn(200, 3, generator=g)
    fields = {f"z{i}": ((3,), torch.float32) for i in range(2)}
    trainer.build(fields, 3, capacity=150, device=torch.device("cpu"))
    trainer.add(zs, teacher)
    for _ in range(5):
        trainer.claim_step()
        trainer.train_step()
    tensors, state = trainer.state_dict()
    resumed = HeadTrainer(eem.heads, cfg, th.RLock(), th.RLock())
    resumed.load_state_dict(tensors, json.loads(json.dumps(state)))
    assert (resumed.credit, resumed.train_steps, resumed.trained_samples) == (
        trainer.credit,
        trainer.train_steps,
        trainer.trained_samples,
    )
    for _ in range(5):  # the same minibatches, the same optimizer moments: the same heads
        trainer.train_step()
        resumed.train_step()
    for a, b in zip(trainer.student.parameters(), resumed.student.parameters(), strict=True):
        assert torch.equal(a, b)
    assert trainer.last_loss == resumed.last_loss


def test_phase_and_exit_states_are_typed_but_report_as_before():
    assert str(PhaseStatus(Phase.WARM_UP)) == "warm-up"
    drift = PhaseStatus(Phase.DRIFT, "exit 0 agreed on 1/2 audited samples")
    assert PhaseStatus.parse(str(drift)) == drift
    learner = OnlineDistiller(toy_wrap(), quick())
    stats = learner.stats()
    assert stats["phase"] == "warm-up"
    assert [type(e["state"]) for e in stats["exits"]] == [str, str]  # plain JSON strings
    assert stats["exits"][0]["state"] == ee.distill.ExitState.CLOSED == "closed"


@pytest.mark.parametrize("field", ["lr", "temperature", "weight_decay"])
def test_config_numbers_beyond_float32_are_refused(field):
    with pytest.raises(ConfigError, match=f"{field} must be a finite number"):
        DistillConfig(**{field: 1e300})


# ------------------------------------------------------------------ what teaches once gates open


def test_teaching_coins_draw_training_side_samples_at_teach_rate():
    from earlyexit.distill.evidence import draw_audit_coins

    held_out = torch.arange(20000) % 4 == 0  # a quarter held out
    g = torch.Generator().manual_seed(0)
    coins = draw_audit_coins(held_out, False, 0.05, 0.25, g, teach_rate=0.3)
    assert abs(float(coins[held_out].float().mean()) - 0.05 / 0.25) < 0.02
    assert abs(float(coins[~held_out].float().mean()) - 0.3) < 0.02
    plain = draw_audit_coins(held_out, False, 0.05, 0.25, torch.Generator().manual_seed(0))
    assert not bool(plain[~held_out].any())  # without teaching: held-out contents only
    assert bool(draw_audit_coins(held_out, True, 0.05, 0.25, g, teach_rate=0.3).all())
    assert DistillConfig(replay_after_open="all", teach_rate=0.3).teaching_rate == 0.0
    assert DistillConfig(teach_rate=0.3).teaching_rate == 0.3


@pytest.mark.parametrize("mode", ["sampled", "all"])
def test_with_a_gate_open_only_rows_drawn_to_run_to_the_end_teach(mode):
    from earlyexit.distill.rows import sort_rows

    eem = toy_wrap()
    config = quick(replay_after_open=mode, teach_rate=0.25)
    learner = OnlineDistiller(eem, config)
    g = torch.Generator().manual_seed(3)
    run(learner, 15, g)
    assert any(t < math.inf for t in eem.thresholds)
    x = stream(512, g, same_halves=0.5)  # half the images lie: some no head answers
    held_out = learner.split.is_calibration(x)
    audit = learner.evidence.draw_audits(held_out, gates_closed=False)
    result, trace = eem.trace(x, audit=audit, input_checked=True)
    rows = sort_rows(eem, config, result, trace, audit, held_out)
    final = trace.final_rows
    ran_on_their_own = ~audit[final] & ~held_out[final]
    assert bool(ran_on_their_own.any())  # samples no head could answer
    want = ~held_out[final] & (audit[final] if mode == "sampled" else True)
    assert torch.equal(rows.train, want)
    assert torch.equal(rows.evidence, audit[final] & held_out[final])
    # The drift monitor hears of held-out audits only, whatever ran to the end to teach.
    audited_early = audit & (result.exit_index < eem.num_exits)
    assert len(rows.audits) == int((audited_early & held_out).sum())
    # Every sample drawn ran to the end and was paid for as such.
    path = eem.path_macs()
    assert rows.spent == sum(
        path[eem.num_exits] if bool(a) else path[int(e)]
        for a, e in zip(audit, result.exit_index, strict=True)
    )


@pytest.mark.parametrize(
    "bad, says",
    [
        ({"replay_after_open": "hard"}, "replay_after_open must be"),
        ({"teach_rate": 1.5}, "teach_rate"),
    ],
)
def test_teaching_settings_are_checked(bad, says):
    with pytest.raises(ConfigError, match=says):
        DistillConfig(**bad)
