"""The command line: help, JSON output, exit codes for the documented errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from earlyexit.cli import SUBCOMMANDS, build_parser, main
from earlyexit.evaluation.report import build_report
from earlyexit.evaluation.stream import StreamRecord

TINY = ["timm:resnet18", "--input-size", "32", "--num-classes", "10"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", [None, "profile", "bench", "report"])
def test_help_teaches_with_examples_and_exit_codes(capsys, command):
    code, out, _ = run(capsys, *([command] if command else []), "--help")
    assert code == 0
    assert "examples:" in out and "exit codes:" in out
    assert "4  unknown model" in out


def test_every_registered_subcommand_is_in_the_parser():
    parser = build_parser()
    names = {p.rsplit(".", 1)[-1] for p in SUBCOMMANDS}
    assert names <= set(parser._subparsers._group_actions[0].choices)


def test_profile_json_is_the_only_stdout(capsys):
    code, out, _ = run(capsys, "profile", *TINY, "--json", "--candidates")
    assert code == 0
    data = json.loads(out)
    assert data["model"] == "timm:resnet18" and data["input_size"] == [3, 32, 32]
    fractions = [e["fraction_of_base"] for e in data["exits"]]
    assert fractions == sorted(fractions) and fractions[-1] < 1
    assert data["final"]["backbone_macs"] == data["base_macs"]
    assert data["candidates"]


def test_profile_text_and_fvcore_cross_check(capsys):
    code, out, _ = run(capsys, "profile", *TINY, "--fvcore")
    assert code == 0
    assert (
        "head overhead" in out
        and "fvcore cross-check" in out
        and "largest difference 0.000%" in out
    )


def test_bench_json(capsys):
    argv = [
        "bench",
        *TINY,
        "--batch-sizes",
        "2",
        "--reps-batched",
        "1",
        "--warmup",
        "0",
        "--mixes",
        "closed,all@0",
        "--json",
        "--no-progress",
    ]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    rows = json.loads(out)["rows"]
    assert [r["mix"] for r in rows] == ["closed", "all@0"]
    assert all(r["ratio_median"] > 0 for r in rows)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["profile", "timm:resnt18"], 4, "did you mean timm:resnet18"),
        (["profile", "torchvision:nope_net"], 4, "unknown model"),
        (["profile", "keras:resnet18"], 4, "unknown model source"),
        (["profile", "timm:resnet18", "--weights", "/no/such/file.pth"], 3, "not found"),
        (["profile", "timm:resnet18", "--input-size", "0"], 2, "invalid size"),
        (["profile", "timm:resnet18", "--input-size", "3x2x"], 2, "invalid size"),
        (["profile", "timm:vit_tiny_patch16_224", "--input-size", "40"], 5, "cannot wrap"),
        (["bench", "timm:resnet18", "--input-size", "32", "--mixes", "nope"], 2, "unknown mix"),
        (["report", "/no/such/run.json"], 3, "not found"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_error_exit_codes(capsys, argv, code, message):
    got, out, err = run(capsys, *argv)
    assert got == code
    assert message in err
    assert out == ""


def test_weights_that_do_not_fit(capsys, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": timm.create_model("resnet18", num_classes=5).state_dict()}, path)
    code, _, err = run(capsys, "profile", *TINY, "--weights", str(path))
    assert code == 5 and "do not fit" in err and "--num-classes" in err
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    code, _, err = run(capsys, "profile", *TINY, "--weights", str(junk))
    assert code == 5 and "could not read weights" in err


def test_weights_that_fit_are_loaded(capsys, tmp_path):
    model = timm.create_model("resnet18", num_classes=10)
    path = tmp_path / "ok.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)  # DDP-style keys
    code, out, _ = run(capsys, "profile", *TINY, "--weights", str(path), "--json")
    assert code == 0 and json.loads(out)["num_classes"] == 10


def _report_file(tmp_path: Path) -> Path:
    rec = StreamRecord(
        scores=torch.tensor([[0.9, 0.1], [0.2, 0.95], [0.1, 0.2]]),
        max_prob=torch.tensor([[0.9, 0.1], [0.2, 0.95], [0.1, 0.2]]),
        preds=torch.tensor([[1, 2], [0, 3], [4, 4]]),
        final_pred=torch.tensor([1, 3, 9]),
        labels=torch.tensor([1, 3, 4]),
        backbone_macs=(10, 30), head_macs=(1, 2), base_macs=100, exit_names=("a", "b"),
    )  # fmt: skip
    path = tmp_path / "run.json"
    path.write_text(json.dumps(build_report(rec, [0.5, math.inf]), allow_nan=False))
    return path


def test_report_renders_markdown_and_png(capsys, tmp_path):
    path = _report_file(tmp_path)
    code, out, _ = run(capsys, "report", str(path))
    assert code == 0 and out.startswith("# earlyexit report")
    assert (tmp_path / "run.md").is_file() and (tmp_path / "run.png").is_file()
    code, out, _ = run(
        capsys, "report", str(path), "--json", "--out", str(tmp_path / "r"), "--no-plot"
    )
    data = json.loads(out)
    assert code == 0 and data["png"] is None and "mac_saving" in data
    not_report = tmp_path / "other.json"
    not_report.write_text("[1, 2]")
    code, _, err = run(capsys, "report", str(not_report))
    assert code == 5 and "not a report" in err


def test_python_dash_m_entry_point():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "earlyexit", "--help"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "profile" in done.stdout
