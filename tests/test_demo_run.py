"""``earlyexit demo`` and ``earlyexit run`` end to end on small slices of the embedded workloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import earlyexit as ee
from earlyexit.cli import main
from earlyexit.evaluation.workloads import DIGITS_CHECKPOINT, load_workload

REQUIRED = (
    "mac_saving",
    "oracle_mac_saving",
    "agreement",
    "accuracy_full",
    "accuracy_early",
    "latency_ratio_b1",
    "throughput_ratio",
)


@pytest.mark.slow
def test_demo_on_digits_writes_a_consistent_report_plot_and_json(tmp_path, capsys):
    # Enough traffic, and a target low enough, that the gates open on this seed: the operating
    # point then sends most samples out early, so the figures below are not all 0 and 1. Linear
    # heads: on digits they learn the most within the learning budget (conv heads get few steps).
    out, n = tmp_path / "demo", 128
    code = main(
        ["demo", "--workload", "digits", "--head", "linear", "--traffic-size", "600",
         "--eval-size", str(n),
         "--target-agreement", "0.9", "--confidence", "0.5", "--out", str(out),
         "--no-latency", "--no-progress", "--json"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)  # stdout is JSON only ...
    assert json.loads((out / "demo_digits.json").read_text()) == report  # ... the file's JSON
    for key in REQUIRED:
        assert key in report
    assert report["stream"]["traffic"] == report["learner"]["samples"] == 600
    assert report["stream"]["evaluation"] == report["stream"]["samples"] == n
    exits, final, base = report["exits"], report["final"], report["base_macs"]
    assert len(exits) == 4 and final["path_macs"] > exits[-1]["path_macs"]
    rates = [e["exit_rate"] for e in exits] + [final["exit_rate"]]
    assert sum(rates[:-1]) > 0.5  # the gates opened: most samples leave early

    # Rates are counts out of n, and every sample leaves somewhere.
    counts = [r * n for r in rates]
    assert counts == [round(c) for c in counts] and sum(counts) == n
    # The operating point's figures, recomputed from the per-exit table.
    assert (
        report["thresholds"] == [e["threshold"] for e in exits] == report["learner"]["thresholds"]
    )
    for e in exits:
        assert e["path_mac_fraction"] == pytest.approx(e["path_macs"] / base, rel=1e-12)
        assert (e["agreement"] is None) == (e["exit_rate"] == 0)  # measured where samples left
        agreeing = (e["agreement"] or 0.0) * e["exit_rate"] * n  # samples that agree: integer
        assert agreeing == pytest.approx(round(agreeing), abs=1e-9)
    expected = sum(e["exit_rate"] * e["path_macs"] for e in exits) + rates[-1] * final["path_macs"]
    assert report["expected_macs"] == pytest.approx(expected, rel=1e-12)
    assert report["mac_saving"] == pytest.approx(1 - expected / base, rel=1e-12)
    agreement = sum(e["exit_rate"] * (e["agreement"] or 0.0) for e in exits) + rates[-1]
    assert report["agreement"] == pytest.approx(agreement, rel=1e-12)
    assert 0.5 < report["agreement"] < 1.0
    # A sample that agrees with the full model is right or wrong with it: accuracy can move only
    # by the share that disagrees.
    gap = abs(report["accuracy_early"] - report["accuracy_full"])
    assert gap <= 1 - report["agreement"] + 1e-12
    point = report["points"]["online heads, operating point"]
    assert point["thresholds"] == report["thresholds"] and point["exit_rates"] == rates
    assert point["exit_agreement"][-1] == 1.0  # the full model agrees with itself
    assert point["mac_saving"] == report["mac_saving"]
    assert point["agreement"] == report["agreement"]
    assert point["accuracy"] == report["accuracy_early"]
    assert report["points"]["full model"]["accuracy"] == report["accuracy_full"]
    oracle = report["points"]["oracle"]
    assert oracle["mac_saving"] == report["oracle_mac_saving"] and oracle["agreement"] == 1.0
    assert sum(oracle["exit_rates"]) == pytest.approx(1.0, abs=1e-12)
    assert report["saving_of_oracle"] == pytest.approx(
        report["mac_saving"] / report["oracle_mac_saving"], rel=1e-12
    )

    # The Markdown carries the JSON's numbers, formatted here independently.
    md = (out / "demo_digits.md").read_text()
    rows = [
        f"| MAC saving (operating point) | {100 * report['mac_saving']:.1f}% |",
        f"| oracle MAC saving | {100 * report['oracle_mac_saving']:.1f}% |",
        f"| agreement with the full model | {100 * report['agreement']:.2f}% |",
        f"| accuracy, full model | {100 * report['accuracy_full']:.2f}% |",
        f"| accuracy, early exit | {100 * report['accuracy_early']:.2f}% |",
        f"| final | full model | | {100 * rates[-1]:.1f}% | 100.00% | |",
        "![trade-off curves](demo_digits.png)",
    ]
    for i, e in enumerate(exits):
        t, a = e["threshold"], e["agreement"]
        rows.append(
            f"| {i} | `{e['name']}` | {t if isinstance(t, str) else f'{t:.4f}'} | "
            f"{100 * e['exit_rate']:.1f}% | {'n/a' if a is None else f'{100 * a:.2f}%'} | "
            f"{100 * e['path_mac_fraction']:.1f}% |"
        )
    for row in rows:
        assert row in md.splitlines(), row
    assert (out / "demo_digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _write_digit_folder(root, n: int = 40, corrupt: int = 2) -> None:
    """An ImageFolder of digit renders from the workload (class folders named by digit)."""
    workload = load_workload("digits", traffic_size=n, eval_size=1)
    for i in range(n):
        image, label = workload.traffic[i]
        pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    for j in range(corrupt):
        (root / "3" / f"broken{j}.png").parent.mkdir(parents=True, exist_ok=True)
        (root / "3" / f"broken{j}.png").write_bytes(b"\x89PNG not really")


RUN_ARGS = ["--model", "timm:regnety_002", "--num-classes", "10", "--input-size", "64",
            "--mean", "0.5", "--std", "0.5", "--crop-pct", "1.0", "--batch-size", "16",
            "--no-latency", "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_run_on_an_image_folder_skips_broken_files_and_saves_heads(tmp_path, capsys):
    data = tmp_path / "images"
    _write_digit_folder(data)
    heads = tmp_path / "heads.safetensors"
    code = main(
        ["run", *RUN_ARGS, "--weights", str(DIGITS_CHECKPOINT), "--data", str(data),
         "--out", str(tmp_path / "out"), "--save", str(heads), "--json"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped_images"]["count"] == 2
    assert report["accuracy_full"] > 0.6  # the shipped backbone reads the PNGs correctly
    assert json.loads((tmp_path / "out" / "run.json").read_text())["skipped_images"]["count"] == 2
    workload = load_workload("digits", traffic_size=1, eval_size=1)
    loaded = ee.load(workload.model, heads)
    assert loaded.num_exits == 4


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--data", "{tmp}/missing"], 3, "data folder not found"),
        (["--data", "{tmp}/empty"], 5, "holds no images"),
        (["--data", "{tmp}/images", "--weights", "{tmp}/nope.pth"], 3, "weights file not found"),
        (["--data", "{tmp}/images", "--weights", "{tmp}/wrong.pth"], 5, "do not fit this model"),
        (["--data", "{tmp}/images", "--model", "timm:not_a_model"], 4, "unknown model"),
    ],
)
def test_run_errors_have_codes_and_messages(tmp_path, capsys, args, code, message):
    import torch

    (tmp_path / "empty").mkdir()
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    argv = ["run", *RUN_ARGS] + [a.format(tmp=tmp_path) for a in args]
    assert main(argv) == code
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("gate", "kind", "mode"), [("learned", "LearnedGate", "learned"),
                                                    ("margin", "MarginGate", "fixed")])  # fmt: skip
def test_pipeline_keeps_a_fixed_gate_and_learns_the_learned_one(tmp_path, gate, kind, mode):
    from earlyexit.evaluation.pipeline import PipelineOptions, serve_and_evaluate

    w = load_workload("digits", traffic_size=64, eval_size=32)
    options = PipelineOptions(gate=gate, latency=False, progress=False)
    result = serve_and_evaluate(
        w.model, w.traffic, w.evaluation, labelled=True, out_dir=tmp_path, options=options,
        input_size=w.input_size, log=lambda message: None,
    )  # fmt: skip
    assert type(result.learner.eem.gate).__name__ == kind
    assert result.learner.config.gate == mode
