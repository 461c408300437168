"""Baselines and reports: offline heads, calibration, report keys, JSON / Markdown / PNG files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAMILIES

import earlyexit as ee
from earlyexit.evaluation.baselines import (
    METHOD_FIXED,
    METHOD_FULL,
    METHOD_OPERATING,
    METHOD_ORACLE,
    METHOD_PATIENCE,
    METHOD_SDN,
    METHOD_SWEEP,
    best_at_agreement,
    calibrate_greedy,
    compare_methods,
    train_heads,
)
from earlyexit.evaluation.policies import evaluate_policy, threshold_exits
from earlyexit.evaluation.report import (
    REQUIRED_KEYS,
    build_report,
    load_report,
    model_meta,
    render_markdown,
    tradeoff_report,
    write_report,
)
from earlyexit.evaluation.stream import record_stream

SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def setup():
    """A tiny resnet, a 'labelled' stream (labels = the model's answer, 20% flipped), and a
    record with features, split into train / evaluation halves."""
    torch.manual_seed(0)
    model = FAMILIES["timm.resnet"][0]().eval()
    eem = ee.wrap(model, input_size=SIZE)
    x = torch.randn(96, *SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model(x).argmax(-1)
    y[::5] = (y[::5] + 1) % 10
    record = record_stream(eem, x, labels=y, keep_features=True, batch_size=32)
    return eem, x, y, record


def test_train_heads_leaves_originals_and_learns(setup):
    eem, _, _, record = setup
    before = [h.fc.weight.clone() for h in eem.heads]
    distilled = train_heads(
        list(eem.heads), record.features, record.final_logits, objective="distill", epochs=15
    )
    for h, w in zip(eem.heads, before, strict=True):
        assert torch.equal(h.fc.weight, w)  # the wrapper's heads are untouched
    rescored = record.with_heads(distilled, eem.gate)
    # Zero-initialised heads predict class 0 everywhere; trained ones agree far more often.
    untrained = (record.preds == record.final_pred[:, None]).float().mean()
    trained = (rescored.preds == rescored.final_pred[:, None]).float().mean()
    assert trained > untrained
    sdn = train_heads(list(eem.heads), record.features, record.labels, epochs=5)
    assert len(sdn) == eem.num_exits
    with pytest.raises(ValueError):
        train_heads(list(eem.heads), record.features, record.labels, objective="distill")


def test_calibrate_greedy_meets_the_target_on_its_data(setup):
    eem, _, _, record = setup
    heads = train_heads(
        list(eem.heads), record.features, record.final_logits, objective="distill", epochs=15
    )
    rec = record.with_heads(heads, eem.gate)
    for target in (0.9, 0.99, 1.0):
        thresholds = calibrate_greedy(rec, target, min_samples=3)
        point = evaluate_policy(rec, "threshold", thresholds=thresholds)
        assert point.agreement >= target
        for rate, agree in zip(point.exit_rates[:-1], point.exit_agreement[:-1], strict=True):
            if rate > 0:
                assert agree >= target


def test_compare_methods_has_every_method(setup):
    eem, _, _, record = setup
    out = compare_methods(record, [0.9] * eem.num_exits, sdn_record=record)
    assert set(out["curves"]) == {METHOD_SWEEP, METHOD_PATIENCE, METHOD_SDN}
    assert {METHOD_FULL, METHOD_ORACLE, METHOD_FIXED, METHOD_OPERATING} <= set(out["points"])
    fixed = out["points"][METHOD_FIXED]
    assert torch.equal(
        torch.tensor(fixed.exit_rates),
        torch.bincount(
            threshold_exits(record, [0.5] * eem.num_exits, score="max_softmax"),
            minlength=eem.num_exits + 1,
        )
        / record.num_samples,
    )
    best = best_at_agreement(out["curves"][METHOD_SWEEP], 1.0)
    assert best is not None and best.agreement == 1.0
    assert best_at_agreement([], 0.9) is None


def test_report_has_required_keys_and_strict_json(setup, tmp_path):
    eem, _, _, record = setup
    thresholds = [0.2, math.inf, 0.15, 0.12]
    report = build_report(
        record,
        thresholds,
        model=model_meta(eem, "tiny"),
        stream={"name": "random"},
        latency={"latency_ratio_b1": 0.7, "throughput_ratio": 1.3},
    )
    for key in REQUIRED_KEYS:
        assert key in report
    assert report["accuracy_full"] is not None and report["accuracy_early"] is not None
    assert len(report["exits"]) == eem.num_exits
    for e in report["exits"]:
        assert {"threshold", "exit_rate", "agreement"} <= set(e)
    assert report["exits"][1]["threshold"] == "inf"
    op = evaluate_policy(record, "threshold", thresholds=thresholds)
    assert report["mac_saving"] == op.mac_saving and report["agreement"] == op.agreement
    assert report["oracle_mac_saving"] == evaluate_policy(record, "oracle").mac_saving
    assert report["latency_ratio_b1"] == 0.7
    text = json.dumps(report, allow_nan=False)  # strict JSON: no Infinity/NaN literals
    assert "Infinity" not in text
    paths = write_report(report, tmp_path, "run")
    assert paths["json"].is_file() and paths["md"].is_file()
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = paths["md"].read_text()
    assert "| MAC saving (operating point) |" in md and "![trade-off curves](run.png)" in md
    assert load_report(paths["json"])["mac_saving"] == report["mac_saving"]


def test_unlabelled_report_has_null_accuracy(setup):
    eem, _, _, record = setup
    unlabelled = record.subset(slice(None))
    unlabelled.labels = None
    report = build_report(unlabelled, [math.inf] * eem.num_exits)
    assert report["accuracy_full"] is None and report["accuracy_early"] is None
    assert report["mac_saving"] == 0.0 and report["agreement"] == 1.0
    assert report["latency_ratio_b1"] is None
    md = render_markdown(report)
    assert "unlabelled" in md and "n/a" in md


def test_load_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_report(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_report(bad)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"mac_saving": 0.1}))
    with pytest.raises(ValueError, match="missing"):
        load_report(partial)


@pytest.mark.slow  # records two streams, trains heads and times the model: ~10 s on 2 cores
def test_tradeoff_report_end_to_end(setup, tmp_path):
    eem, x, y, _ = setup
    report = tradeoff_report(
        eem, x[48:], labels=y[48:], train_data=x[:48], train_labels=y[:48], sdn_epochs=5,
        latency_samples=8, latency_batch=4, progress=False, model_name="tiny",
    )  # fmt: skip
    assert METHOD_SDN in report["curves"]
    assert report["latency_ratio_b1"] > 0 and report["throughput_ratio"] > 0
    assert report["stream"]["samples"] == 48
    write_report(report, tmp_path, "e2e")


def test_json_numbers_are_strict():
    import json
    import math

    import pytest

    from earlyexit._json import json_float, json_safe

    assert json_float(math.inf) == "inf" and json_float(-math.inf) == "-inf"
    assert json_float(None) is None and json_float(0.25) == 0.25
    with pytest.raises(ValueError, match="NaN"):
        json_float(math.nan)  # a NaN threshold is a bug, not a value to hide
    nested = {"t": (math.inf, 1.0), "stats": [{"agreement": math.nan}], "n": 3}
    safe = json_safe(nested)
    assert safe == {"t": ["inf", 1.0], "stats": [{"agreement": None}], "n": 3}
    json.dumps(safe, allow_nan=False)  # strict JSON
