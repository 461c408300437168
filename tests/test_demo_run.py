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
def test_demo_on_digits_writes_report_plot_and_json(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        ["demo", "--workload", "digits", "--traffic-size", "96", "--eval-size", "64", "--out", str(out),
         "--no-latency", "--no-progress", "--json"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)  # stdout is JSON only
    for key in REQUIRED:
        assert key in report
    assert report["accuracy_full"] is not None  # labelled workload
    assert len(report["exits"]) == 4 and all("threshold" in e for e in report["exits"])
    assert report["learner"]["samples"] == 96
    for suffix in ("json", "md", "png"):
        assert (out / f"demo_digits.{suffix}").stat().st_size > 0


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
