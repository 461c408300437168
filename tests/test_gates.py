"""Gates: exact scores on hand-made logits, history handling, and history gates in a wrapped model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch

import earlyexit as ee
from earlyexit.errors import ConfigError
from earlyexit.gates import (
    AgreementGate,
    GateContext,
    PatienceGate,
    agreement_score,
    all_gate_scores,
    gate_names,
    gate_scores,
    gini_score,
    make_gate,
    margin_score,
    max_softmax_score,
    neg_entropy_score,
    patience_score,
    stack_trace_logits,
)

# softmax([ln 3, 0]) = [0.75, 0.25]; zeros over 4 classes = uniform.
SURE = torch.tensor([[math.log(3.0), 0.0]])
UNIFORM = torch.zeros(1, 4)


def onehot(classes: list[int], k: int = 4, scale: float = 5.0) -> torch.Tensor:
    """Logits whose argmax per row is ``classes[row]``."""
    out = torch.zeros(len(classes), k)
    out[torch.arange(len(classes)), torch.tensor(classes)] = scale
    return out


def test_confidence_scores_exact_on_hand_made_logits():
    assert max_softmax_score(SURE).item() == pytest.approx(0.75)
    assert margin_score(SURE).item() == pytest.approx(0.5)
    assert neg_entropy_score(SURE).item() == pytest.approx(
        0.75 * math.log(0.75) + 0.25 * math.log(0.25)
    )
    assert gini_score(SURE).item() == pytest.approx(0.75**2 + 0.25**2)
    assert max_softmax_score(UNIFORM).item() == pytest.approx(0.25)
    assert margin_score(UNIFORM).item() == pytest.approx(0.0)
    assert neg_entropy_score(UNIFORM).item() == pytest.approx(-math.log(4))
    assert gini_score(UNIFORM).item() == pytest.approx(0.25)
    assert margin_score(torch.zeros(2, 1)).tolist() == [1.0, 1.0]  # one class: fully sure


def test_scores_are_float32_for_half_logits():
    for fn in (max_softmax_score, margin_score, neg_entropy_score, gini_score):
        assert fn(SURE.half()).dtype == torch.float32


def test_agreement_vote_share_with_fixed_denominator_and_none_history():
    cur = onehot([0, 1, 2])
    h0 = onehot([0, 0, 2])
    h1 = onehot([0, 1, 1])
    # k=2: current + h0 + h1 vote; row 0: 3/3, row 1: 2/3 (h1), row 2: 2/3 (h0).
    assert agreement_score(cur, [h0, h1], k=2).tolist() == pytest.approx([1.0, 2 / 3, 2 / 3])
    # Only the last k heads vote: k=1 looks at h1 only.
    assert agreement_score(cur, [h0, h1], k=1).tolist() == pytest.approx([1.0, 1.0, 0.5])
    # A head that was not evaluated votes against; missing heads at the first exits too.
    assert agreement_score(cur, [h0, None], k=2).tolist() == pytest.approx([2 / 3, 1 / 3, 2 / 3])
    assert agreement_score(cur, [], k=2).tolist() == pytest.approx([1 / 3] * 3)
    assert agreement_score(cur, [h0, h1], k=0).tolist() == [1.0, 1.0, 1.0]


def test_agreement_members_vote_on_ensemble_tiers():
    cur = onehot([0, 1])
    members = [onehot([0, 1]), onehot([0, 0]), onehot([3, 1]), onehot([0, 2])]
    assert agreement_score(cur, members=members).tolist() == pytest.approx([0.75, 0.5])


def test_agreement_gate_with_confidence_multiplies():
    gate = AgreementGate(k=1, confidence="max_softmax")
    ctx = GateContext(1, torch.arange(1), [torch.tensor([[1.0, 0.0]])])
    assert gate.score(SURE, ctx).item() == pytest.approx(0.75)
    ctx = GateContext(1, torch.arange(1), [torch.tensor([[0.0, 1.0]])])
    assert gate.score(SURE, ctx).item() == pytest.approx(0.5 * 0.75)
    with pytest.raises(ConfigError, match="confidence"):
        AgreementGate(confidence="entropy")
    with pytest.raises(ConfigError, match="non-negative"):
        AgreementGate(k=-1)


def test_patience_counts_consecutive_agreeing_heads_back_from_the_last():
    cur = onehot([0, 0, 0, 1])
    history = [onehot([0, 1, 0, 1]), onehot([0, 0, 1, 1]), onehot([0, 0, 0, 1])]
    assert patience_score(cur, history).tolist() == [3.0, 2.0, 1.0, 3.0]
    assert patience_score(cur, []).tolist() == [0.0] * 4
    # A head that was not evaluated ends the streak.
    assert patience_score(cur, [history[0], None, history[2]]).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert patience_score(cur, [history[0], history[1], None]).tolist() == [0.0] * 4


def test_make_gate_names_configs_and_round_trip():
    assert {"agreement", "patience", "max_softmax", "margin", "entropy", "gini"} <= set(
        gate_names()
    )
    gate = make_gate({"name": "agreement", "k": 3, "confidence": "margin"})
    assert isinstance(gate, AgreementGate) and gate.k == 3 and gate.confidence == "margin"
    assert make_gate(gate.config()).config() == gate.config()
    assert isinstance(make_gate("patience"), PatienceGate)
    assert make_gate("patience").needs_history and not make_gate("margin").needs_history


def test_gate_scores_offline_matches_manual_history():
    stack = torch.stack([onehot([0, 1]), onehot([0, 0]), onehot([0, 0])], dim=1)  # [2, 3, 4]
    assert gate_scores("patience", stack).tolist() == [[0.0, 1.0, 2.0], [0.0, 0.0, 1.0]]
    final = onehot([0, 2])
    with_final = gate_scores(AgreementGate(k=1), stack, final)
    assert with_final.shape == (2, 4)
    assert with_final[:, 3].tolist() == [1.0, 0.5]
    scores = all_gate_scores(stack)
    assert set(scores) == set(gate_names())
    assert all(s.shape == (2, 3) for s in scores.values())
    assert torch.equal(scores["margin"], margin_score(stack))
    with pytest.raises(ConfigError, match=r"\[N, E, K\]"):
        gate_scores("margin", torch.zeros(2, 3))


def _route_heads(
    eem: ee.EarlyExitModel, x: torch.Tensor, high: torch.Tensor, plans: list[tuple[int, int]]
) -> None:
    """Make linear head ``i`` predict class ``plans[i][1]`` for the rows marked ``high`` of ``x``
    and ``plans[i][0]`` for the others (an exact least-squares fit on that batch's features)."""
    _, trace = eem.trace(x)
    sign = high.float() * 2 - 1
    for i, (low_cls, high_cls) in enumerate(plans):
        head = eem.heads[i]
        with torch.no_grad():
            z = head.norm(trace.exits[i].z[torch.argsort(trace.exits[i].rows)])
            w = torch.linalg.lstsq(z.double(), sign.double()[:, None]).solution[:, 0].float()
            assert torch.equal((z @ w > 0), high)
            head.fc.weight.zero_()
            head.fc.bias.zero_()
            head.fc.weight[high_cls] = 100.0 * w
            head.fc.weight[low_cls] = -100.0 * w


def test_patience_and_agreement_gates_in_a_wrapped_model(resnet):
    x = batch(n=6)
    eem = ee.wrap(resnet, input_size=(3, 64, 64), gate="patience")
    assert eem.num_exits == 4
    # Every head predicts class 1 for "low" rows; heads 0 and 1 predict 2 for "high" rows, heads
    # 2 and 3 predict 3 for them.
    high = torch.tensor([False, True, False, True, True, False])
    _route_heads(eem, x, high, [(1, 2), (1, 2), (1, 3), (1, 3)])
    _, trace = eem.trace(x)
    stack = stack_trace_logits(trace, 6)
    assert stack.argmax(-1).tolist() == [[2, 2, 3, 3] if h else [1, 1, 1, 1] for h in high]
    # Patience 1: low rows agree from exit 1 on; high rows at exit 1 (2 == 2).
    eem.set_thresholds([1.0] * 4)
    res = eem.predict(x)
    assert res.exit_index.tolist() == [1] * 6
    # Patience 2: low rows leave at exit 2; high rows change class at exit 2, so at exit 3 their
    # streak is 1 (exit 2 only): they run to the end.
    eem.set_thresholds([2.0] * 4)
    res = eem.predict(x)
    expected = torch.where(high, 4, 2)
    assert res.exit_index.tolist() == expected.tolist()
    assert res.confidence[~high].tolist() == [2.0] * int((~high).sum())
    # Only exit 3 open: heads 0-2 still run (history), so low rows leave at 3 with patience 3.
    eem.set_thresholds([math.inf, math.inf, math.inf, 3.0])
    res = eem.predict(x)
    assert res.exit_index.tolist() == torch.where(high, 4, 3).tolist()

    # Agreement of the last 2 heads (k=1): all low rows at exit 1; high rows at exit 1 too, and
    # with k=2 (3 votes) high rows fail at exit 2 (3 vs 2, 2) and 3 (3, 3, 2 -> 2/3).
    eem.gate = AgreementGate(k=2)
    eem.set_thresholds([1.0] * 4)
    res = eem.predict(x)
    assert res.exit_index.tolist() == torch.where(high, 4, 2).tolist()
    eem.set_thresholds([0.6] * 4)  # two of three votes suffice
    res = eem.predict(x)
    assert res.exit_index.tolist() == [1] * 6
    # Recorded per-exit scores in the trace equal the offline computation on the stack.
    eem.set_thresholds([math.inf] * 4)
    _, trace = eem.trace(x)
    offline = gate_scores(eem.gate, stack)
    for e, record in enumerate(trace.exits):
        torch.testing.assert_close(record.scores, offline[record.rows, e])


def test_score_gates_keep_their_names_reprs_and_configs():
    from earlyexit.gates import (
        CONFIDENCE_SCORES,
        EntropyGate,
        GiniGate,
        MarginGate,
        MaxSoftmaxGate,
        ScriptedExitGate,
    )

    logits = torch.randn(4, 3)
    ctx = GateContext(0, torch.arange(4))
    for cls, name in (
        (MaxSoftmaxGate, "max_softmax"),
        (MarginGate, "margin"),
        (EntropyGate, "entropy"),
        (GiniGate, "gini"),
    ):
        gate = make_gate(name)
        assert type(gate) is cls and repr(gate) == f"{cls.__name__}()"
        assert gate.config() == {"name": name} and not gate.needs_history
        assert torch.equal(gate.score(logits, ctx), CONFIDENCE_SCORES[name](logits))
    # Moved out of the latency harness; the old import path still works.
    from earlyexit.evaluation.latency import ScriptedExitGate as FromLatency

    assert FromLatency is ScriptedExitGate


def _non_finite_rows() -> torch.Tensor:
    return torch.tensor(
        [
            [2.0, 0.0, -1.0],
            [float("nan"), 0.0, 1.0],
            [float("inf"), 0.0, 1.0],
            [float("-inf"), float("-inf"), float("-inf")],
        ]
    )


@pytest.mark.parametrize("gate", ["max_softmax", "margin", "entropy", "gini", "learned", "fitted"])
def test_gates_that_claim_to_propagate_non_finite_logits_score_them_nan(gate):
    # Serving skips its own check for these gates: the claim must hold for every such gate.
    from earlyexit.gates import AGREEMENT_FEATURES, LearnedGate

    if gate == "fitted":  # weight only on the last feature: NaN elsewhere must still show
        width = len(AGREEMENT_FEATURES)
        g = LearnedGate([[0.0] * (width - 1) + [1.0]], [0.0], use_history=False)
    else:
        g = make_gate(gate)
    assert g.propagates_non_finite
    logits = _non_finite_rows()
    scores = g.score(logits, GateContext(0, torch.arange(4)))
    assert torch.isfinite(scores[0]) and torch.isnan(scores[1:]).all()
    assert torch.equal(
        g.checked_score(logits, GateContext(0, torch.arange(4))).isnan(), scores.isnan()
    )


@pytest.mark.parametrize("gate", ["patience", "agreement"])
def test_argmax_gates_are_checked_so_non_finite_logits_let_nothing_out(gate):
    g = make_gate(gate)
    assert not g.propagates_non_finite
    logits = _non_finite_rows()
    ctx = GateContext(1, torch.arange(4), [logits])
    assert torch.isnan(g.checked_score(logits, ctx)[1:]).all()
    assert torch.isfinite(g.checked_score(logits, ctx)[0])
