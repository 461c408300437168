"""The offline recipe (``offline_recipe``) and its threshold rule, and the savings harness."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils.data import TensorDataset

import earlyexit as ee
from earlyexit.evaluation.baselines import (
    METHOD_RECIPE,
    converge_heads,
    first_threshold_reaching,
    offline_recipe,
)
from earlyexit.evaluation.policies import threshold_exits

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- threshold rule


def _hand_case():
    # Two exits, five samples. Candidate thresholds ascending: .2 .3 .4 .5 .6 .7 .8 .9 .95.
    max_prob = torch.tensor(
        [
            [0.95, 0.30],  # leaves at exit 0 up to .95, agrees there
            [0.90, 0.20],  # leaves at exit 0 up to .9, DISagrees there
            [0.40, 0.80],  # exit 0 up to .4 (agrees), then exit 1 up to .8 (agrees)
            [0.50, 0.70],  # exit 0 up to .5 (disagrees), then exit 1 up to .7 (agrees)
            [0.60, 0.20],  # exit 0 up to .6, agrees
        ]
    )
    preds = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1], [1, 0]])
    final = torch.tensor([1, 1, 1, 1, 1])
    return max_prob, preds, final


def test_threshold_is_the_first_reaching_the_target_exactly():
    max_prob, preds, final = _hand_case()
    # Among early exits: at t <= .5 the two disagreeing samples leave (3/5); at .6 sample 3 leaves
    # at exit 1 and agrees, sample 1 still disagrees (4/5 = .8); at .95 only sample 0 leaves
    # (1/1), at .9 samples 0 and 1 (1/2). So 0.8 is first reached at .6, and 1.0 only at .95.
    assert first_threshold_reaching(max_prob, preds, final, 0.8) == pytest.approx(0.6)
    assert first_threshold_reaching(max_prob, preds, final, 0.81) == pytest.approx(0.95)
    assert first_threshold_reaching(max_prob, preds, final, 1.0) == pytest.approx(0.95)
    # Over all samples (those that run to the end agree): 3/5 up to .5 (samples 1 and 3 out and
    # wrong), 4/5 from .6 (sample 3 moves on to exit 1 and agrees), 5/5 only at .95.
    assert first_threshold_reaching(max_prob, preds, final, 0.8, on="all") == pytest.approx(0.6)
    assert first_threshold_reaching(max_prob, preds, final, 0.9, on="all") == pytest.approx(0.95)
    # A candidate needs min_exits leaving: at .95 only one does.
    assert first_threshold_reaching(max_prob, preds, final, 1.0, min_exits=2) == math.inf


def test_threshold_is_the_first_reach_not_the_best_agreement():
    # Agreement among exits dips again above the first threshold that reaches the target.
    max_prob = torch.tensor([[0.9], [0.8], [0.7], [0.6]])
    preds = torch.tensor([[0], [1], [1], [0]])
    final = torch.tensor([1, 1, 1, 1])
    # .6: 2/4; .7: 2/3; .8: 1/2; .9: 0/1. Target .6 is first reached at .7 though .8 is lower.
    assert first_threshold_reaching(max_prob, preds, final, 0.6) == pytest.approx(0.7)
    assert first_threshold_reaching(max_prob, preds, final, 0.7) == math.inf


def test_threshold_ignores_non_finite_scores():
    # A NaN score (non-finite logits) is no candidate and never leaves, even at the lowest one.
    max_prob = torch.tensor([[float("nan")], [0.8], [0.7]])
    preds = torch.tensor([[0], [1], [0]])
    final = torch.tensor([1, 1, 1])
    assert first_threshold_reaching(max_prob, preds, final, 0.99) == pytest.approx(0.8)
    assert first_threshold_reaching(max_prob, preds, final, 0.5) == pytest.approx(0.7)
    assert first_threshold_reaching(max_prob, preds, final, 0.5, on="all") == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_prob": torch.zeros(3)}, r"max_prob and preds must both be \[N, E\]"),
        ({"preds": torch.zeros(3, 2, dtype=torch.long)}, r"max_prob and preds must both be"),
        ({"final_pred": torch.zeros(2, dtype=torch.long)}, r"final_pred must be \[N\] = \[3\]"),
        ({"target": 0.0}, r"target must be in \(0, 1\]"),
        ({"target": 1.5}, r"target must be in \(0, 1\]"),
        ({"on": "some"}, r"on must be 'exited' or 'all'"),
        ({"min_exits": 0}, r"min_exits must be >= 1"),
    ],
)
def test_threshold_rule_rejects_bad_input(kwargs, message):
    args = {
        "max_prob": torch.rand(3, 1),
        "preds": torch.zeros(3, 1, dtype=torch.long),
        "final_pred": torch.zeros(3, dtype=torch.long),
        "target": 0.9,
    }
    args.update(kwargs)
    rest = {k: args.pop(k) for k in ("on", "min_exits") if k in args}
    with pytest.raises(ValueError, match=message):
        first_threshold_reaching(
            args["max_prob"], args["preds"], args["final_pred"], args["target"], **rest
        )


# --------------------------------------------------------------------------- the recipe


@pytest.fixture(scope="module")
def small_stream():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    x = torch.randn(96, 3, 32, 32)
    with torch.no_grad():
        final = model(x).argmax(-1)
    names = [e.name for e in ee.wrap(model, input_size=(3, 32, 32)).exits]
    return model, x, final, names


def _recipe(model, data, names, **kwargs):
    return offline_recipe(
        model, data, exits=names, input_size=(3, 32, 32), epochs=3, batch_size=32, **kwargs
    )


def test_recipe_never_trains_on_labels_and_leaves_the_model_alone(small_stream):
    model, x, _final, names = small_stream
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = torch.randint(0, 4, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(2))
    a = _recipe(model, TensorDataset(x, y), names)
    b = _recipe(model, TensorDataset(x, y[perm]), names)
    c = _recipe(model, x, names)  # no labels at all
    for other in (b, c):
        assert other.threshold == a.threshold
        for ha, hb in zip(a.heads, other.heads, strict=True):
            sa, sb = ha.state_dict(), hb.state_dict()
            assert sa.keys() == sb.keys()
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # The base model: same weights and buffers, no hooks left behind, still in eval mode.
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not model.training
    assert a.eem.base_model is not model
    # Linear heads at the exits asked for.
    assert [e.name for e in a.eem.exits] == names
    assert all(type(h).__name__ == "LinearHead" for h in a.heads)


def test_recipe_threshold_is_first_reach_on_the_last_share_of_traffic(small_stream):
    model, x, final, names = small_stream
    target = 0.75
    recipe = _recipe(model, x, names, target=target, calibration_share=0.25)
    assert recipe.calibration_samples == 24 and recipe.traffic_samples == 96
    record = recipe.record(x)
    cal = record.subset(slice(72, 96))
    assert torch.equal(cal.final_pred, final[72:])
    expected = first_threshold_reaching(cal.max_prob, cal.preds, cal.final_pred, target)
    assert recipe.threshold == expected
    assert recipe.eem.thresholds == (expected,) * recipe.eem.num_exits
    # Served and replayed agree: the recipe's wrapper lets out exactly what the replay does.
    replay = threshold_exits(record, [recipe.threshold] * record.num_exits, score="max_softmax")
    assert torch.equal(record.served_exit, replay)
    point = recipe.evaluate(record)
    assert point.method == METHOD_RECIPE and point.param == recipe.threshold
    info = recipe.to_dict()
    assert info["calibration_samples"] == 24 and info["epochs"] == 3
    json.dumps(info)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"calibration_share": 0.0}, r"calibration_share must be in \(0, 1\]"),
        ({"epochs": 0}, r"epochs must be >= 1"),
        ({"temperature": 0.0}, r"temperature must be > 0"),
        ({"on": "x"}, r"on must be 'exited' or 'all'"),
        ({"target": 2.0}, r"target must be in \(0, 1\]"),
    ],
)
def test_recipe_rejects_bad_arguments(small_stream, kwargs, message):
    model, x, _final, names = small_stream
    args = {"epochs": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        offline_recipe(model, x[:8], exits=names, input_size=(3, 32, 32), **args)


def test_converge_heads_returns_fresh_heads_and_a_falling_loss(small_stream):
    model, x, _final, _names = small_stream
    eem = ee.wrap(model, head="conv", input_size=(3, 32, 32))
    rec = ee.evaluation.record_stream(eem, x, keep_features=True)
    before = [{k: v.clone() for k, v in h.state_dict().items()} for h in eem.heads]
    heads, curves = converge_heads(eem.heads, rec.features, rec.final_logits, epochs=6)
    assert len(heads) == len(curves) == eem.num_exits
    assert all(len(c) == 6 and c[-1] < c[0] for c in curves)
    for h, b in zip(eem.heads, before, strict=True):  # the wrapper's heads are not touched
        assert all(torch.equal(h.state_dict()[k], b[k]) for k in b)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        converge_heads(eem.heads, rec.features, rec.final_logits, epochs=0)


# --------------------------------------------------------------------------- the harness


@pytest.mark.slow
def test_savings_quick_run_writes_its_json(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "savings.py"),
        "--quick",
        "--no-earlyon",
        "--workload",
        "digits",
        "--threads",
        "1",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| ours: online, label-free, calibrated |" in done.stdout
    payload = json.loads((tmp_path / "savings_digits.json").read_text())
    assert payload["workload"] == "digits"
    (run,) = payload["runs"]
    assert run["seed"] == 0 and run["traffic_samples"] == 600 and run["eval_samples"] == 300
    methods = [r["method"] for r in run["rows"]]
    assert methods[0].startswith("ours") and methods[1].startswith("offline recipe")
    assert methods[-1].startswith("oracle") and not any("earlyon" in m for m in methods)
    for r in run["rows"]:
        for key in ("mac_saving", "agreement", "agreement_exited", "accuracy_full", "meets_target"):
            assert key in r
    ours = run["rows"][0]
    for key in ("first_saving_at", "learning_cost", "converged_agreement", "converged_gap"):
        assert key in ours
    assert set(run["verdict"]) >= {"agreement_ok", "saving_ge_recipe", "saving_ge_earlyon", "meets"}
    assert run["verdict"]["saving_ge_earlyon"] is None
    assert any("--no-earlyon" in n for n in run["notes"])
    assert payload["summary"]["runs"] == 1
    # Strict JSON: the file parses without NaN or Infinity literals.
    text = (tmp_path / "savings_digits.json").read_text()
    assert "NaN" not in text and "Infinity" not in text


def _savings_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("savings", ROOT / "benchmarks" / "savings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_savings_config_overrides_pass_through_and_are_checked(capsys):
    savings = _savings_module()
    assert savings.parse_config(["batch_size=32", "train_time_budget=none", "gate=fixed"]) == {
        "batch_size": 32,
        "train_time_budget": None,
        "gate": "fixed",
    }
    args = savings.parse_args(["--config", "batch_size=32", "--quick"])
    assert args.config == ["batch_size=32"] and args.traffic_size == 600
    assert args.converge_epochs == 8 and args.eo_epochs == [5]
    for bad, message in (
        (["--config", "no_such_field=1"], "no_such_field"),
        (["--config", "target_agreement=2"], "target_agreement must be in"),
        (["--target", "1.5"], "--target must be in"),
    ):
        with pytest.raises(SystemExit):
            savings.parse_args(bad)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--config takes key=value"):
        savings.parse_args(["--config", "foo"])
