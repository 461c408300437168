"""Wall-clock work on heads and gates: cheaper paths compute the same answers, switched-off exits'
heads never run, and exit selection can price heads in measured time."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_distill import quick, run, toy_wrap
from torch import nn

import earlyexit as ee
from earlyexit.distill import DistillConfig
from earlyexit.distill.calibrator import PolicyCalibrator
from earlyexit.errors import ConfigError
from earlyexit.gates import GateContext, LearnedGate, MaxSoftmaxGate, agreement_features, make_gate
from earlyexit.head_timing import exit_features, measure_head_time_fractions
from earlyexit.routing import heads_evaluated, simulate_exits


class Three(nn.Module):
    """Three stages, the middle ones far costlier than the first; a pooled linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.s1 = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU())
        self.s2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.s3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.s3(self.s2(self.s1(x))).mean(dim=(2, 3)))


def three_wrap(head: str = "linear") -> ee.EarlyExitModel:
    torch.manual_seed(0)
    eem = ee.wrap(Three().eval(), exits=["s1", "s2", "s3"], head=head, input_size=(3, 8, 8))
    with torch.no_grad():  # heads start at zero (uniform answers): give them opinions
        for p in eem.heads.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return eem


def fitted_gate(num_exits: int = 3, **kwargs) -> LearnedGate:
    g = torch.Generator().manual_seed(1)
    weights = (torch.randn(num_exits, 7, generator=g)).tolist()
    return LearnedGate(weights, torch.randn(num_exits, generator=g).tolist(), **kwargs)


def reference(eem: ee.EarlyExitModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and exit index by hand: every head on the whole batch, the exit rule on the scores
    (the gate sees every earlier head, as a trace does), the base model for the rest."""
    names = [p.name for p in eem.exits]
    with torch.no_grad():
        feats = exit_features(eem.base_model, names, x)
        logits = [h.classify(h.reduce(f)) for h, f in zip(eem.heads, feats, strict=True)]
        rows = torch.arange(x.shape[0])
        scores = torch.stack(
            [
                eem.gate.checked_score(out, GateContext(i, rows, logits[:i]))
                for i, out in enumerate(logits)
            ],
            1,
        )
        final = eem.base_model(x)
    where = simulate_exits(scores, list(eem.thresholds))
    answer = torch.stack([[*logits, final][int(w)][r] for r, w in enumerate(where)])
    return answer, where


@pytest.mark.parametrize("head", ["linear", "conv"])
@pytest.mark.parametrize("learned", [False, True])
def test_served_answers_match_the_exit_rule_at_batch_1_and_batched(head, learned):
    eem = three_wrap(head)
    if learned:
        eem.gate = fitted_gate()
    x = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    eem.set_thresholds([math.inf] * 3)
    _, scores_free = reference(eem, x)  # all closed: everyone runs to the end
    assert bool((scores_free == 3).all())
    # Thresholds at score quantiles, so rows leave at every exit.
    names = [p.name for p in eem.exits]
    with torch.no_grad():
        feats = exit_features(eem.base_model, names, x)
        logits = [h.classify(h.reduce(f)) for h, f in zip(eem.heads, feats, strict=True)]
        rows = torch.arange(24)
        scores = [
            eem.gate.checked_score(out, GateContext(i, rows, logits[:i]))
            for i, out in enumerate(logits)
        ]
    eem.set_thresholds(
        [float(s.quantile(q)) for s, q in zip(scores, (0.85, 0.8, 0.9), strict=True)]
    )
    want, where = reference(eem, x)
    assert len(set(where.tolist())) == 4  # every exit and the end answer someone
    # Batch 1 (the fast path): each row alone, bit-identical to the rule applied to it alone.
    for r in range(24):
        one = x[r : r + 1]
        res = eem.predict(one)
        ref_logits, ref_where = reference(eem, one)
        assert torch.equal(res.logits, ref_logits) and torch.equal(res.exit_index, ref_where)
        assert int(ref_where) == int(where[r])
    # Batched (rows leave part by part): the same decisions; logits up to the float reordering
    # of running later layers on fewer rows than the reference's whole batch.
    res = eem.predict(x)
    assert torch.equal(res.exit_index, where)
    torch.testing.assert_close(res.logits, want, atol=1e-5, rtol=1e-5)


def test_a_batch_that_leaves_whole_stops_the_forward_pass():
    eem = three_wrap()
    later = []
    eem.base_model.s2.register_forward_pre_hook(lambda m, a: later.append(a[0].shape[0]))
    x = torch.randn(6, 3, 8, 8)
    eem.set_thresholds([-math.inf, math.inf, math.inf])
    for batch in (x, x[:1]):
        res = eem.predict(batch)
        want = eem.heads[0](exit_features(eem.base_model, ["s1"], batch)[0])
        later.clear()  # exit_features ran s2; only the served call counts
        res = eem.predict(batch)
        assert later == []  # no layer after exit 0 ran
        assert torch.equal(res.exit_index, torch.zeros(batch.shape[0], dtype=torch.long))
        assert torch.equal(res.logits, want)


def test_log_odds_feature_is_unchanged_by_the_one_op_max():
    g = torch.Generator().manual_seed(3)
    logits = torch.cat([torch.randn(64, 7, generator=g), torch.randint(0, 3, (64, 7)).float()])
    x = logits.float()
    log_probs = x.log_softmax(-1)
    pred = x.argmax(-1, keepdim=True)
    log_p1 = log_probs.gather(-1, pred).squeeze(-1)  # how it was computed before
    log_rest = log_probs.scatter(-1, pred, float("-inf")).logsumexp(-1)
    before = (log_p1 - log_rest).clamp(-30.0, 30.0)
    assert torch.equal(agreement_features(logits)[:, 3], before)


# ------------------------------------------------------------------------ switched-off heads
def count_head_calls(eem: ee.EarlyExitModel) -> list[int]:
    calls = [0] * eem.num_exits
    for i, head in enumerate(eem.heads):
        reduce = head.reduce

        def counted(feature, i=i, reduce=reduce):
            calls[i] += 1
            return reduce(feature)

        head.reduce = counted  # instance attribute: shadows the method for this head only
    return calls


def test_a_head_the_learned_gate_does_not_read_never_runs():
    eem = three_wrap()
    x = torch.randn(4, 3, 8, 8)
    calls = count_head_calls(eem)
    eem.set_thresholds([math.inf, math.inf, -math.inf])  # only exit 2 open
    eem.gate = fitted_gate()  # reads every head: all three run
    eem.predict(x)
    assert calls == [1, 1, 1]
    eem.gate = fitted_gate(history_exits=[True, False, True])  # exit 1 switched off
    calls[:] = [0, 0, 0]
    for _ in range(3):
        eem.predict(x)
        eem.predict(x[:1])
    assert calls == [6, 0, 6]
    # Its MACs are not charged either.
    path = eem.path_macs()
    b, h = eem.backbone_macs, eem.head_macs
    assert path[2] == b[2] + h[0] + h[2]


def test_the_look_back_of_a_restricted_gate_is_the_previous_read_head():
    g = torch.Generator().manual_seed(4)
    h0, h1, h2 = (torch.randn(5, 6, generator=g) for _ in range(3))
    rows = torch.arange(5)
    full, skipping = fitted_gate(), fitted_gate(history_exits=[True, False, True])
    # Skipping head 1 scores exit 2 exactly as if head 0 were the only earlier head ...
    want = full.score(h2, GateContext(2, rows, [h0]))
    assert torch.equal(skipping.score(h2, GateContext(2, rows, [h0, h1])), want)
    assert torch.equal(skipping.score(h2, GateContext(2, rows, [h0, None])), want)
    # ... and a gate that reads every head is unchanged.
    assert torch.equal(
        fitted_gate(history_exits=[True, True, True]).score(h2, GateContext(2, rows, [h0, h1])),
        full.score(h2, GateContext(2, rows, [h0, h1])),
    )
    assert skipping.history_sources(3) == (True, False, True)
    assert LearnedGate(history_exits=[True, False]).history_sources(2) == (False, False)
    assert heads_evaluated([False, False, True], [True, False, True]) == (True, False, True)
    assert heads_evaluated([True, False, False], [True, True, True]) == (True, False, False)
    with pytest.raises(ConfigError, match="one history source flag per exit"):
        heads_evaluated([True, False], [True])


def test_learned_gate_history_exits_round_trips_and_is_checked():
    gate = fitted_gate(history_exits=[True, False, True])
    again = make_gate(json.loads(json.dumps(gate.config())))
    assert again.history_exits == (True, False, True)
    assert torch.equal(again.weights, gate.weights)
    old = fitted_gate().config()
    assert "history_exits" not in old  # configs saved before the field still read the same
    assert make_gate(old).history_exits is None
    assert gate.reading(None).history_exits is None
    assert torch.equal(gate.reading([True] * 3).bias, gate.bias)
    for bad in ([1, 0, 1], "yes", [True, "no"]):
        with pytest.raises(ConfigError, match="history_exits"):
            fitted_gate(history_exits=bad)


def test_learner_serves_without_the_heads_of_switched_off_exits():
    eem = toy_wrap(expensive_first=True)  # exit 1 saves nothing: switched off
    learner = ee.OnlineDistiller(eem, quick())
    run(learner, 60, torch.Generator().manual_seed(8), same_halves=0.3)
    assert learner.stats()["exits"][1]["state"] == "switched off"
    gate = eem.gate
    if isinstance(gate, LearnedGate) and gate.needs_history:
        assert gate.history_exits == (True, False)
    calls = count_head_calls(eem)
    eem.predict(torch.rand(8, 3, 8, 8))
    assert calls[1] == 0


# ------------------------------------------------------------------------ pricing in time
def select_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Nobody is sure at exit 0; half leave at exit 1 (agreeing), the rest at exit 2."""
    n = 400
    half = torch.arange(n) % 2 == 0
    scores = torch.stack(
        [torch.full((n,), 0.1), torch.where(half, 0.9, 0.1), torch.full((n,), 0.9)], 1
    )
    agree = torch.stack(
        [torch.zeros(n, dtype=torch.bool), half, torch.ones(n, dtype=torch.bool)], 1
    )
    return scores, agree


def test_time_pricing_switches_off_an_exit_whose_head_costs_more_time_than_it_saves():
    eem = three_wrap()
    scores, agree = select_case()
    target = dict(target_agreement=0.95)
    by_macs = PolicyCalibrator(eem, DistillConfig(**target))
    enabled, _ = by_macs.select_exits(scores, agree, MaxSoftmaxGate())
    assert enabled[1]  # exit 1 saves the s3 MACs of half the rows, far more than its head
    by_time = PolicyCalibrator(
        eem, DistillConfig(**target, head_cost="time", head_time_fractions=[0.01, 0.6, 0.01])
    )
    enabled_t, switched_t = by_time.select_exits(scores, agree, MaxSoftmaxGate())
    assert not enabled_t[1]
    assert "time-equivalent MACs" in switched_t[1]
    assert by_time.selection_head_costs(MaxSoftmaxGate())[1] == pytest.approx(0.6 * eem.base_macs)
    cheap = PolicyCalibrator(
        eem, DistillConfig(**target, head_cost="time", head_time_fractions=[0.01, 0.001, 0.01])
    )
    assert cheap.select_exits(scores, agree, MaxSoftmaxGate())[0][1]
    wrong = PolicyCalibrator(eem, DistillConfig(head_cost="time", head_time_fractions=[0.1]))
    with pytest.raises(ConfigError, match="expected 3"):
        wrong.select_exits(scores, agree, MaxSoftmaxGate())


def test_head_time_is_measured_once_when_no_table_is_given():
    eem = three_wrap()
    calibrator = PolicyCalibrator(eem, DistillConfig(head_cost="time"))
    assert calibrator.head_time_fractions is None
    costs = calibrator.selection_head_costs(eem.gate)
    shares = calibrator.head_time_fractions
    assert len(shares) == 3 and all(s > 0 and math.isfinite(s) for s in shares)
    assert calibrator.selection_head_costs(eem.gate) == costs  # kept, not measured again
    assert len(measure_head_time_fractions(eem, batch_size=2, reps=1, warmup=0)) == 3
    with pytest.raises(ConfigError, match="batch_size"):
        measure_head_time_fractions(eem, batch_size=0)
    before = {k: v.clone() for k, v in eem.base_model.state_dict().items()}
    measure_head_time_fractions(eem, reps=1)
    after = eem.base_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks or len(m._forward_hooks) <= 1 for m in eem.base_model.modules())


def test_head_cost_config_round_trips_and_rejects_bad_values():
    cfg = DistillConfig(head_cost="time", head_time_fractions=[0.05, 0.1, 0])
    assert cfg.head_time_fractions == (0.05, 0.1, 0.0)
    assert DistillConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert DistillConfig().head_cost == "macs" and DistillConfig().head_time_fractions is None
    old = DistillConfig().to_dict()
    del old["head_cost"], old["head_time_fractions"]  # a config saved before the knobs
    assert DistillConfig.from_dict(old) == DistillConfig()
    with pytest.raises(ConfigError, match="head_cost must be 'macs' or 'time'"):
        DistillConfig(head_cost="flops")
    with pytest.raises(ConfigError, match="only with head_cost='time'"):
        DistillConfig(head_time_fractions=[0.1])
    for bad in ([], "0.1", [0.1, -0.2], [math.nan], [True], [math.inf], 0.1):
        with pytest.raises(ConfigError, match="head_time_fractions"):
            DistillConfig(head_cost="time", head_time_fractions=bad)


def test_a_saved_model_keeps_which_heads_its_gate_reads(tmp_path):
    eem = three_wrap()
    eem.gate = fitted_gate(history_exits=[True, False, True])
    eem.set_thresholds([math.inf, math.inf, 0.5])
    eem.save(tmp_path / "m")
    loaded = ee.load(eem.base_model, tmp_path / "m")
    assert loaded.gate.history_exits == (True, False, True)
    x = torch.randn(5, 3, 8, 8)
    assert torch.equal(loaded.predict(x).logits, eem.predict(x).logits)
