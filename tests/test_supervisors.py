"""Final supervisor: policies on a wrapped model, thresholds for a target false-alarm rate, AUROC."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch
from scipy import stats
from sklearn.metrics import roc_auc_score

import earlyexit as ee
from earlyexit.errors import ConfigError
from earlyexit.supervisors import (
    FallbackError,
    Supervisor,
    UntrustedPredictionError,
    accepted_accuracy_curve,
    auroc,
    make_supervisor,
    right_predictions,
    threshold_for_fpr,
)


@pytest.fixture
def served(resnet):
    """A wrapped resnet with a max-softmax supervisor rejecting about half of a batch of 6."""
    x = batch(n=6)
    eem = ee.wrap(resnet, input_size=(3, 64, 64), supervisor="max_softmax")
    with torch.no_grad():
        full = resnet(x)
    scores = eem.supervisor.score(full)
    eem.supervisor.threshold = float(scores.median())
    return eem, x, full, scores >= eem.supervisor.threshold


def test_flag_policy_marks_rejected_rows(served):
    eem, x, full, trusted = served
    assert 0 < int(trusted.sum()) < 6
    res = eem.predict(x)
    assert res.accepted.tolist() == trusted.tolist()
    torch.testing.assert_close(res.logits, full)


def test_raise_policy_carries_the_result(served):
    eem, x, _full, trusted = served
    eem.supervisor.policy = "raise"
    with pytest.raises(UntrustedPredictionError, match="does not trust") as info:
        eem.predict(x)
    assert info.value.result.accepted.tolist() == trusted.tolist()
    assert info.value.rows.tolist() == torch.nonzero(~trusted).flatten().tolist()
    eem.supervisor.threshold = -math.inf  # nothing rejected: no exception
    assert eem.predict(x).accepted.all()


def test_fallback_policy_answers_rejected_rows(served):
    eem, x, full, trusted = served
    seen = {}

    def fallback(x_rows, result_rows):
        seen["rows"] = x_rows.shape[0]
        seen["accepted"] = result_rows.accepted.tolist()
        return torch.full((x_rows.shape[0], 10), 7.0)

    eem.supervisor = Supervisor(
        "max_softmax", eem.supervisor.threshold, policy="fallback", fallback=fallback
    )
    res = eem.predict(x)
    assert seen == {"rows": int((~trusted).sum()), "accepted": [False] * int((~trusted).sum())}
    assert torch.equal(res.logits[~trusted], torch.full((int((~trusted).sum()), 10), 7.0))
    torch.testing.assert_close(res.logits[trusted], full[trusted])
    assert res.accepted.tolist() == trusted.tolist()  # still says who the model did not answer
    eem.supervisor.fallback = lambda xr, rr: torch.zeros(1, 3)
    with pytest.raises(FallbackError, match="shape"):
        eem.predict(x)


def test_policy_validation_and_config_round_trip():
    with pytest.raises(ConfigError, match="policy"):
        Supervisor(policy="ignore")
    with pytest.raises(ConfigError, match="fallback"):
        Supervisor(policy="fallback")
    sup = Supervisor("margin", 0.25, policy="raise")
    again = make_supervisor(sup.config())
    assert (again.name, again.threshold, again.policy) == ("margin", 0.25, "raise")
    restored = make_supervisor(
        Supervisor("gini", 0.5, policy="fallback", fallback=lambda a, b: a).config()
    )
    assert restored.policy == "flag"  # a callable cannot be saved


def test_threshold_for_fpr_empirical_hand_made():
    scores = torch.tensor([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    correct = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1, 0, 0]).bool()  # 6 right
    # Rejecting at most 1 of 6 right (fpr 0.2): cut at the 2nd lowest right score (0.5).
    assert threshold_for_fpr(scores, correct, 0.2) == pytest.approx(0.5)
    # 2 of 6 allowed at 0.34: cut at 0.6, which rejects 0.5 and 0.3 (right) and 0.4, 0.2, 0.1.
    assert threshold_for_fpr(scores, correct, 0.34) == pytest.approx(0.6)
    assert threshold_for_fpr(scores, correct, 0.1) == pytest.approx(0.3)  # none rejected
    with pytest.raises(ConfigError, match="no right"):
        threshold_for_fpr(scores, torch.zeros(10, dtype=torch.bool), 0.1)
    with pytest.raises(ConfigError, match="target_fpr"):
        threshold_for_fpr(scores, correct, 0.0)


def test_threshold_for_fpr_with_confidence_is_the_beta_quantile_rule():
    n = 400
    scores = torch.arange(n, dtype=torch.float32)
    correct = torch.ones(n, dtype=torch.bool)
    t = threshold_for_fpr(scores, correct, 0.05, confidence=0.9)
    m = int(t)  # rejects the m lowest
    assert stats.beta.cdf(0.05, m + 1, n - m) >= 0.9 > stats.beta.cdf(0.05, m + 2, n - m - 1)
    assert m < 0.05 * n  # stricter than the empirical rule
    # Too little evidence even for m = 0: accept everything.
    assert threshold_for_fpr(scores[:10], correct[:10], 0.05, confidence=0.9) == -math.inf


def test_threshold_with_confidence_holds_on_fresh_data():
    g = torch.Generator().manual_seed(0)
    violations = 0
    trials = 200
    for _ in range(trials):
        t = threshold_for_fpr(torch.rand(300, generator=g), torch.ones(300).bool(), 0.1, 0.9)
        violations += t > 0.1  # uniform scores: the true false-alarm rate is t itself
    assert violations / trials <= 0.1 + 0.05


def test_auroc_hand_made_and_against_sklearn():
    pos = torch.tensor([1, 1, 0, 0]).bool()
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), pos) == 1.0
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), pos) == 0.0
    assert auroc(torch.ones(4), pos) == 0.5
    assert auroc(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1, 0, 1, 0]).bool()) == 0.75
    assert math.isnan(auroc(torch.ones(3), torch.ones(3).bool()))
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 20, (500,), generator=g).float()  # many ties
    y = torch.rand(500, generator=g) < s / 25
    assert auroc(s, y) == pytest.approx(roc_auc_score(y.numpy(), s.numpy()))


def test_accepted_accuracy_curve_hand_made():
    scores = torch.tensor([0.9, 0.8, 0.8, 0.5, 0.1])
    correct = torch.tensor([1, 1, 0, 1, 0]).bool()
    curve = accepted_accuracy_curve(scores, correct)
    assert curve["threshold"] == pytest.approx([0.1, 0.5, 0.8, 0.9])
    assert curve["rejected"] == pytest.approx([0.0, 0.2, 0.4, 0.8])
    assert curve["accepted_accuracy"] == pytest.approx([0.6, 0.75, 2 / 3, 1.0])


def test_calibrate_on_labels_and_on_a_reference_tier():
    logits = torch.tensor([[4.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.5, 0.0], [0.0, 0.3]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    assert right_predictions(logits, labels).tolist() == [True, True, True, False, True]
    sup = Supervisor()
    info = sup.calibrate(logits, labels, target_fpr=0.25)
    # 4 right; rejecting 1 of them is allowed: the lowest right score is row 4's.
    assert info.right == 4 and info.false_alarm_rate == 0.25
    assert sup.accept(logits).tolist() == [True, True, True, False, False]
    assert info.accepted_accuracy == 1.0 and info.rejected == pytest.approx(0.4)
    assert info.auroc == pytest.approx(0.75)
    reference = torch.tensor([[1.0, 0.0]] * 5)  # a larger tier that always says class 0
    assert right_predictions(logits, reference).tolist() == [True, True, False, True, False]
    with pytest.raises(ConfigError, match="reference"):
        right_predictions(logits, torch.zeros(3, dtype=torch.long))


def test_supervisor_scores_are_the_gates_confidence_scores():
    from earlyexit import errors
    from earlyexit.gates import CONFIDENCE_SCORES

    logits = torch.randn(6, 5)
    for name, fn in CONFIDENCE_SCORES.items():
        assert torch.equal(Supervisor(name).score(logits), fn(logits))
    with pytest.raises(ConfigError, match="choose one of entropy, gini, margin, max_softmax"):
        Supervisor("agreement")
    # The errors moved to earlyexit.errors; the old import path gives the same classes.
    assert UntrustedPredictionError is errors.UntrustedPredictionError
    assert FallbackError is errors.FallbackError
