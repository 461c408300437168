"""LearnedGate: agreement features, the logistic-regression fit, config round trip, errors."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from earlyexit.errors import ConfigError
from earlyexit.gates import (
    AGREEMENT_FEATURES,
    GateContext,
    LearnedGate,
    agreement_features,
    fit_learned_gate,
    gate_names,
    gate_scores,
    make_gate,
    max_softmax_score,
)

NUM_EXITS = 4


def _synthetic(n: int, seed: int, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads that are noisy copies of a teacher, noisier early; noise shared along the depth so
    consecutive heads are correlated. Returns ``[N, E, K]`` head logits and ``[N, K]`` teacher."""
    g = torch.Generator().manual_seed(seed)
    teacher = 3.0 * torch.randn(n, num_classes, generator=g)
    scale = torch.rand(n, 1, generator=g) * 1.5 + 0.25  # per-sample difficulty
    heads = []
    shared = torch.zeros(n, num_classes)
    for e, sigma in enumerate([2.0, 1.5, 1.0, 0.6]):
        shared = 0.6 * shared + torch.randn(n, num_classes, generator=g)
        own = torch.randn(n, num_classes, generator=g)
        heads.append((1.0 + 0.3 * e) * teacher * scale + sigma * (shared + own))
    return torch.stack(heads, dim=1), teacher


def _features(heads: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [
            agreement_features(heads[:, e], [heads[:, i] for i in range(e)])
            for e in range(heads.shape[1])
        ],
        dim=1,
    )


def _agree(heads: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return heads.argmax(dim=-1) == teacher.argmax(dim=-1, keepdim=True)


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney AUROC, ties given their average rank."""
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    ranks = ((last - counts + 1 + last) / 2)[inverse]
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.fixture(scope="module")
def fitted_data():
    heads, teacher = _synthetic(8192, seed=0)
    feats, agree = _features(heads), _agree(heads, teacher)
    fit_learned_gate(feats[:256], agree[:256])  # warm-up: the first fit in a process pays imports
    start = time.perf_counter()
    gate = fit_learned_gate(feats, agree)
    elapsed = time.perf_counter() - start
    return gate, feats, agree, elapsed


def test_feature_names_and_ranges():
    assert len(AGREEMENT_FEATURES) == 7
    g = torch.Generator().manual_seed(1)
    cur = 4.0 * torch.randn(64, 6, generator=g)
    history = [4.0 * torch.randn(64, 6, generator=g) for _ in range(2)]
    for hist in ([], history, [history[0], None], [None, history[1]]):
        f = agreement_features(cur, hist)
        assert f.shape == (64, 7) and f.dtype == torch.float32
        assert torch.isfinite(f).all()
        p1, margin, ent, log_odds, agrees, prev_prob, mean_max = f.unbind(-1)
        assert ((p1 >= 1 / 6 - 1e-6) & (p1 <= 1)).all()
        assert ((margin >= 0) & (margin <= p1 + 1e-7)).all()
        assert ((ent >= 0) & (ent <= 1)).all()
        assert ((log_odds >= -30) & (log_odds <= 30)).all()
        assert set(agrees.unique().tolist()) <= {0.0, 1.0}
        assert ((prev_prob >= 0) & (prev_prob <= 1)).all()
        assert ((mean_max >= 1 / 6 - 1e-6) & (mean_max <= 1 + 1e-6)).all()
    # Without history the look-back columns are 0 and mean_max_prob is p1.
    f = agreement_features(cur)
    assert torch.equal(f[:, 4], torch.zeros(64)) and torch.equal(f[:, 5], torch.zeros(64))
    assert torch.equal(f[:, 6], f[:, 0])
    assert torch.equal(f[:, 0], max_softmax_score(cur))


def test_features_exact_values_on_a_hand_made_example():
    cur = torch.tensor(
        [[math.log(3.0), 0.0, 0.0], [0.0, math.log(3.0), 0.0]]
    )  # [.6 .2 .2], [.2 .6 .2]
    prev = torch.tensor([[0.0, math.log(2.0), 0.0], [0.0, math.log(2.0), 0.0]])  # [.25 .5 .25] x2
    entropy = -(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2))
    base = [0.6, 0.4, 1.0 - entropy / math.log(3.0), math.log(1.5)]

    # Row 0: previous head disagrees; row 1: previous head agrees.
    f = agreement_features(cur, [prev])
    expected = torch.tensor(
        [
            [*base, 0.0, 0.25, max(0.6 + 0.25, 0.2 + 0.5, 0.2 + 0.25) / 2],
            [*base, 1.0, 0.5, max(0.2 + 0.25, 0.6 + 0.5, 0.2 + 0.25) / 2],
        ]
    )
    torch.testing.assert_close(f, expected, atol=1e-6, rtol=0)

    # No history.
    torch.testing.assert_close(
        agreement_features(cur), torch.tensor([[*base, 0.0, 0.0, 0.6]] * 2), atol=1e-6, rtol=0
    )
    # The last entry None: no look-back signal, but the mean still includes the earlier head.
    torch.testing.assert_close(
        agreement_features(cur, [prev, None]),
        expected * torch.tensor([1, 1, 1, 1, 0, 0, 1]),
        atol=1e-6,
        rtol=0,
    )
    # A None before the last entry is skipped by the mean; the last entry drives the look-back.
    torch.testing.assert_close(agreement_features(cur, [None, prev]), expected, atol=1e-6, rtol=0)
    # Three heads in the mean.
    mean3 = agreement_features(cur, [prev, prev])[:, 6]
    torch.testing.assert_close(mean3, torch.tensor([0.2 + 1.0, 0.6 + 1.0]) / 3, atol=1e-6, rtol=0)


def test_features_edge_cases():
    # One class: everything maximal, log-odds clamped.
    f = agreement_features(torch.tensor([[0.3], [-2.0]]))
    assert torch.equal(f, torch.tensor([[1.0, 1.0, 1.0, 30.0, 0.0, 0.0, 1.0]] * 2))
    # Extreme logits stay finite and clamped both ways.
    f = agreement_features(torch.tensor([[1000.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.isfinite(f).all()
    assert f[0, 3].item() == 30.0 and f[0, 2].item() == pytest.approx(1.0)
    assert f[1, 3].item() == pytest.approx(math.log(0.5), abs=1e-6)  # 1/3 vs 2/3
    assert f[1, 2].item() == pytest.approx(0.0, abs=1e-6)
    assert agreement_features(torch.tensor([[0.0, 1e4]]))[0, 3].item() == 30.0
    # Half-precision logits give float32 features.
    assert agreement_features(torch.randn(3, 4).half()).dtype == torch.float32
    with pytest.raises(ConfigError, match="history entry 0"):
        agreement_features(torch.zeros(2, 3), [torch.zeros(2, 4)])


def test_unfitted_gate_is_max_softmax():
    gate = make_gate("learned")
    assert isinstance(gate, LearnedGate) and "learned" in gate_names()
    assert not gate.fitted and gate.num_exits == 0 and not gate.needs_history
    assert repr(gate) == "LearnedGate(unfitted, use_history=True)"
    logits = torch.randn(5, 3, 7, generator=torch.Generator().manual_seed(2))
    assert torch.equal(gate_scores(gate, logits), gate_scores("max_softmax", logits))
    assert json.loads(json.dumps(gate.config())) == gate.config()
    assert not make_gate(gate.config()).fitted


def test_fit_ranks_and_calibrates_on_held_out_data(fitted_data):
    gate, _, _, elapsed = fitted_data
    assert elapsed < 1.0, f"fit took {elapsed:.2f}s"
    assert gate.fitted and gate.num_exits == NUM_EXITS and gate.needs_history
    assert repr(gate) == f"LearnedGate(fitted, exits={NUM_EXITS}, use_history=True)"
    heads, teacher = _synthetic(8192, seed=1)
    agree = _agree(heads, teacher)
    scores = gate_scores(gate, heads)
    baseline = gate_scores("max_softmax", heads)
    assert scores.shape == (8192, NUM_EXITS) and scores.dtype == torch.float32
    for e in range(NUM_EXITS):
        rate = agree[:, e].float().mean().item()
        assert 0.15 < rate < 0.95, rate  # both classes present at every exit
        learned_auc = _auroc(scores[:, e], agree[:, e])
        base_auc = _auroc(baseline[:, e], agree[:, e])
        assert learned_auc > 0.65, (e, learned_auc)
        assert learned_auc >= base_auc - 0.02, (e, learned_auc, base_auc)
        predicted = torch.sigmoid(scores[:, e]).mean().item()
        assert abs(predicted - rate) < 0.05, (e, predicted, rate)
    # Pooled over exits, one scale: the learned score ranks better than max-softmax.
    assert _auroc(scores.flatten(), agree.flatten()) > _auroc(baseline.flatten(), agree.flatten())


def test_auroc_helper():
    labels = torch.tensor([0, 0, 1, 1])
    assert _auroc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert _auroc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert _auroc(torch.tensor([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    assert _auroc(torch.tensor([0.1, 0.3, 0.3, 0.4]), labels) == 0.875


def test_gate_scores_matches_manual_features_and_final_column(fitted_data):
    gate, feats, _, _ = fitted_data
    heads, teacher = _synthetic(8192, seed=0)
    scores = gate_scores(gate, heads, teacher)
    manual = (feats * gate.weights).sum(-1) + gate.bias
    torch.testing.assert_close(scores[:, :NUM_EXITS], manual, atol=1e-5, rtol=1e-5)
    # The final classifier (exit_index == num_exits) is scored by max-softmax.
    assert torch.equal(scores[:, NUM_EXITS], max_softmax_score(teacher))
    # Direct call with a context, as the wrapper does.
    ctx = GateContext(2, torch.arange(8192), [heads[:, 0], heads[:, 1]])
    assert torch.equal(gate.score(heads[:, 2], ctx), scores[:, 2])


def test_config_round_trips_bit_exactly_through_json(fitted_data):
    gate = fitted_data[0]
    config = gate.config()
    assert config["name"] == "learned" and config["use_history"] is True
    assert all(type(v) is float for row in config["weights"] for v in row)
    assert all(type(v) is float for v in config["bias"])
    rebuilt = make_gate(json.loads(json.dumps(config)))
    assert isinstance(rebuilt, LearnedGate) and rebuilt.config() == config
    assert torch.equal(rebuilt.weights, gate.weights) and torch.equal(rebuilt.bias, gate.bias)
    heads, teacher = _synthetic(512, seed=3)
    assert torch.equal(gate_scores(rebuilt, heads, teacher), gate_scores(gate, heads, teacher))


def test_without_history():
    heads, teacher = _synthetic(2048, seed=4)
    feats, agree = _features(heads), _agree(heads, teacher)
    gate = fit_learned_gate(feats, agree, use_history=False)
    assert gate.fitted and not gate.needs_history and not gate.use_history
    assert torch.equal(gate.weights[:, 4:], torch.zeros(NUM_EXITS, 3))
    assert torch.isfinite(gate.weights).all() and gate.weights[:, :4].abs().sum() > 0
    # Scoring ignores the history it is given.
    ctx_with = GateContext(2, torch.arange(2048), [heads[:, 0], heads[:, 1]])
    ctx_without = GateContext(2, torch.arange(2048), [])
    assert torch.equal(gate.score(heads[:, 2], ctx_with), gate.score(heads[:, 2], ctx_without))
    # A hand-built gate with look-back weights but use_history=False never looks back.
    w = [[0.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0]]
    hand = LearnedGate(w, [0.0], use_history=False)
    assert not hand.needs_history
    assert torch.equal(
        hand.score(heads[:, 1], GateContext(0, torch.arange(2048), [heads[:, 0]])),
        agreement_features(heads[:, 1])[:, 3],
    )
    assert LearnedGate(w, [0.0]).needs_history


def test_needs_history_is_per_instance():
    assert LearnedGate.needs_history is False
    fitted = LearnedGate([[0.0] * 7], [0.0])
    assert fitted.needs_history is True
    assert LearnedGate().needs_history is False
    assert LearnedGate([[0.0] * 7], [0.0], use_history=False).needs_history is False
    assert LearnedGate.needs_history is False  # the instance did not leak into the class


def test_exit_with_all_one_class_gets_finite_weights():
    heads, teacher = _synthetic(1024, seed=5)
    feats, agree = _features(heads), _agree(heads, teacher)
    agree[:, 0] = True
    agree[:, 1] = False
    gate = fit_learned_gate(feats, agree)
    assert torch.isfinite(gate.weights).all() and torch.isfinite(gate.bias).all()
    assert gate.weights.abs().max() < 1e3 and gate.bias.abs().max() < 1e3
    probs = torch.sigmoid(gate_scores(gate, heads))
    assert probs[:, 0].min() > 0.9 and probs[:, 1].max() < 0.1


def test_fit_is_deterministic_and_works_under_inference_mode():
    heads, teacher = _synthetic(512, seed=6)
    feats, agree = _features(heads), _agree(heads, teacher)
    first = fit_learned_gate(feats, agree)
    with torch.inference_mode():
        inf_feats, inf_agree = _features(heads), _agree(heads, teacher)
        second = fit_learned_gate(inf_feats, inf_agree)
    with torch.no_grad():
        third = fit_learned_gate(feats, agree.to(torch.int64))
    assert first.config() == second.config() == third.config()


def test_constant_feature_gets_zero_weight():
    heads, teacher = _synthetic(512, seed=7)
    feats, agree = _features(heads), _agree(heads, teacher)
    gate = fit_learned_gate(feats, agree)
    # Exit 0 has no history: prev_agrees and prev_prob_of_pred are constant 0.
    assert gate.weights[0, 4].item() == 0.0 and gate.weights[0, 5].item() == 0.0


def test_gate_errors():
    good = [[0.0] * 7, [1.0] * 7]
    with pytest.raises(ConfigError, match="2 weight rows but 1 biases"):
        LearnedGate(good, [0.0])
    with pytest.raises(ConfigError, match=r"weights\[1\] has 6 values, expected 7"):
        LearnedGate([[0.0] * 7, [0.0] * 6], [0.0, 0.0])
    with pytest.raises(ConfigError, match="finite"):
        LearnedGate([[0.0] * 6 + [float("nan")]], [0.0])
    with pytest.raises(ConfigError, match="finite"):
        LearnedGate([[float("inf")] + [0.0] * 6], [0.0])
    with pytest.raises(ConfigError, match="finite"):
        LearnedGate([[0.0] * 7], [float("nan")])
    with pytest.raises(ConfigError, match="float32"):
        LearnedGate([[1e39] + [0.0] * 6], [0.0])
    with pytest.raises(ConfigError, match="number"):
        LearnedGate([["a"] * 7], [0.0])
    with pytest.raises(ConfigError, match="sequence"):
        LearnedGate("0000000", [0.0])
    with pytest.raises(ConfigError, match="both weights and bias"):
        LearnedGate(good, None)
    with pytest.raises(ConfigError, match="both weights and bias"):
        LearnedGate(None, [0.0])
    with pytest.raises(ConfigError, match="one row per exit"):
        LearnedGate([], [])
    with pytest.raises(ConfigError, match="use_history"):
        LearnedGate(use_history="yes")
    with pytest.raises(ConfigError, match="exit_index"):
        LearnedGate(good, [0.0, 0.0]).score(torch.zeros(1, 2), GateContext(-1, torch.arange(1)))
    # Tensors are accepted as weights and bias.
    assert LearnedGate(torch.zeros(2, 7), torch.zeros(2)).num_exits == 2


def test_fit_errors():
    feats, agree = torch.rand(100, 2, 7), torch.rand(100, 2) > 0.5
    with pytest.raises(ConfigError, match=r"\[N, E, 7\]"):
        fit_learned_gate(torch.rand(100, 7), agree)
    with pytest.raises(ConfigError, match=r"\[N, E, 7\]"):
        fit_learned_gate(torch.rand(100, 2, 6), agree)
    with pytest.raises(ConfigError, match=r"agree must be \[N, E\]"):
        fit_learned_gate(feats, agree[:, :1])
    with pytest.raises(ConfigError, match=r"agree must be \[N, E\]"):
        fit_learned_gate(feats, agree[:50])
    with pytest.raises(ConfigError, match="at least min_samples=64"):
        fit_learned_gate(feats[:63], agree[:63])
    with pytest.raises(ConfigError, match="at least min_samples=200"):
        fit_learned_gate(feats, agree, min_samples=200)
    with pytest.raises(ConfigError, match="no exits"):
        fit_learned_gate(torch.rand(100, 0, 7), torch.zeros(100, 0, dtype=torch.bool))
    bad = feats.clone()
    bad[3, 1, 2] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        fit_learned_gate(bad, agree)
    with pytest.raises(ConfigError, match="0/1"):
        fit_learned_gate(feats, agree.long() * 2)
    with pytest.raises(ConfigError, match="l2"):
        fit_learned_gate(feats, agree, l2=0.0)
    with pytest.raises(ConfigError, match="l2"):
        fit_learned_gate(feats, agree, l2=float("nan"))
    with pytest.raises(ConfigError, match="min_samples"):
        fit_learned_gate(feats, agree, min_samples=0)
    with pytest.raises(ConfigError, match="use_history"):
        fit_learned_gate(feats, agree, use_history=1)
    # 64 samples is enough by default.
    assert fit_learned_gate(feats[:64], agree[:64]).num_exits == 2
