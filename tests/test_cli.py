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


# ------------------------------------------------------------------ data problems are not bugs
RUN = ["run", "--model", "timm:resnet18", "--num-classes", "10", "--input-size", "32",
       "--seed", "0", "--eval-fraction", "0.2", "--no-latency", "--no-progress"]  # fmt: skip


def _image_folder(root: Path, n: int) -> list[Path]:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"{i:02d}.png" for i in range(n)]
    for i, path in enumerate(paths):
        Image.new("RGB", (16, 16), (i * 20, 80, 160)).save(path)
    return paths


@pytest.mark.parametrize("split", ["held-out", "traffic"])
def test_run_names_the_files_when_a_split_has_no_readable_image(capsys, tmp_path, split):
    from earlyexit.data import scan_folder, split_stream

    data = tmp_path / "images"
    _image_folder(data, 10)
    traffic, held_out = split_stream(scan_folder(data), lambda image: image, seed=0)
    broken = (held_out if split == "held-out" else traffic).files
    for path in broken:
        path.write_bytes(b"not an image")
    code, out, err = run(capsys, *RUN, "--data", str(data), "--out", str(tmp_path / "out"))
    assert code == 5 and out == ""
    assert f"none of the {len(broken)} {split} image file(s) could be read" in err
    assert all(str(path) in err for path in broken[:5])
    assert "unexpected" not in err


def test_run_on_a_file_says_it_is_a_file(capsys, tmp_path):
    image = _image_folder(tmp_path / "images", 1)[0]
    code, _, err = run(capsys, *RUN, "--data", str(image))
    assert code == 5 and f"{image} is a file" in err and "not found" not in err


def test_run_on_a_folder_of_one_unreadable_image_says_so(capsys, tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    (data / "only.jpg").write_bytes(b"\xff\xd8 truncated")
    code, _, err = run(capsys, *RUN, "--data", str(data))
    assert code == 5 and "the only image" in err and "only.jpg" in err and "unreadable" in err
    assert "too few" not in err
    _image_folder(data, 1)  # one readable, one not: says how many of them read
    code, _, err = run(capsys, *RUN, "--data", str(data), "--eval-fraction", "0.9")
    assert code == 5 and "2 images (1 readable) are too few" in err and "only.jpg" in err


def test_report_errors_name_the_file(capsys, tmp_path):
    binary = tmp_path / "binary.json"
    binary.write_bytes(bytes(range(256)))
    code, out, err = run(capsys, "report", str(binary))
    assert code == 5 and out == "" and str(binary) in err and "not JSON" in err
    code, _, err = run(capsys, "report", str(tmp_path))
    assert code == 5 and f"{tmp_path} is a folder" in err
    wrong_kinds = json.loads(_report_file(tmp_path).read_text())
    wrong_kinds["mac_saving"] = "lots"
    wrong_kinds["exits"][0]["exit_rate"] = "x"
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(wrong_kinds))
    code, _, err = run(capsys, "report", str(edited), "--no-plot")
    assert code == 5 and str(edited) in err and "wrong kind" in err
    wrong_kinds["exits"] = [1, 2]
    edited.write_text(json.dumps(wrong_kinds))
    code, _, err = run(capsys, "report", str(edited))
    assert code == 5 and "exit 0 is not an object" in err
