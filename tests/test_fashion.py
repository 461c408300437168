"""The fashion workload: shipped Fashion-MNIST test split, fine-tuned EfficientNet-Lite0, demo."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from earlyexit.cli import main
from earlyexit.evaluation.workloads import _fashion as fm
from earlyexit.evaluation.workloads import load_workload
from earlyexit.evaluation.workloads._fashion import (
    FASHION_CHECKPOINT,
    FASHION_DATA_DIR,
    ShippedFileError,
    fashion_preprocess,
    fashion_record,
    load_fashion_backbone,
    read_fashion_split,
    read_idx,
)

IMAGES = "t10k-images-idx3-ubyte.gz"
LABELS = "t10k-labels-idx1-ubyte.gz"


# ---------------------------------------------------------------- shipped test split


def test_shipped_test_split_is_the_published_one() -> None:
    images, labels = read_fashion_split("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10  # 1,000 test images per class
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]  # the published file's first labels
    assert "MIT" in (FASHION_DATA_DIR / "LICENSE").read_text()


def test_only_the_test_split_is_shipped() -> None:
    with pytest.raises(ValueError, match="only the test split is shipped"):
        read_fashion_split("train")
    with pytest.raises(ValueError, match="unknown split"):
        read_fashion_split("validation")


def _copy_split(tmp_path):
    folder = tmp_path / "fashion_mnist"
    shutil.copytree(FASHION_DATA_DIR, folder)
    return folder


def _gzip(path, payload: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "file not found"),
        ("not gzip", "not a readable gzip file"),
        ("truncated gzip", "not a readable gzip file"),
        ("empty", "no idx header"),
        ("wrong magic", "not an idx file of rank 3"),
        ("short data", "holds 100 bytes of data"),
    ],
)
def test_a_damaged_shipped_file_names_itself_and_says_reinstall(
    tmp_path, monkeypatch, damage, message
) -> None:
    folder = _copy_split(tmp_path)
    target = folder / IMAGES
    if damage == "missing":
        target.unlink()
    elif damage == "not gzip":
        target.write_bytes(b"<html>not found</html>")
    elif damage == "truncated gzip":
        target.write_bytes(target.read_bytes()[:5000])
    elif damage == "empty":
        _gzip(target, b"")
    elif damage == "wrong magic":
        _gzip(target, np.array([2049, 1], dtype=">u4").tobytes() + b"\0" * 8)
    elif damage == "short data":
        _gzip(target, np.array([2051, 10, 28, 28], dtype=">u4").tobytes() + b"\0" * 100)
    monkeypatch.setattr(fm, "FASHION_DATA_DIR", folder)
    with pytest.raises(ShippedFileError, match=message) as err:
        read_fashion_split("test")
    assert str(target) in str(err.value) and "reinstall" in str(err.value)


def test_images_and_labels_that_do_not_pair_are_refused(tmp_path, monkeypatch) -> None:
    folder = _copy_split(tmp_path)
    _gzip(folder / LABELS, np.array([2049, 3], dtype=">u4").tobytes() + bytes([1, 2, 3]))
    monkeypatch.setattr(fm, "FASHION_DATA_DIR", folder)
    with pytest.raises(ShippedFileError, match="do not form a Fashion-MNIST split"):
        read_fashion_split("test")


def test_a_user_folder_error_does_not_say_reinstall(tmp_path) -> None:
    with pytest.raises(ShippedFileError, match="file not found") as err:
        read_fashion_split("train", tmp_path)
    assert "reinstall" not in str(err.value) and "download the dataset" in str(err.value)


def test_read_idx_reads_labels() -> None:
    labels = read_idx(FASHION_DATA_DIR / LABELS, rank=1)
    assert labels.shape == (10000,) and labels.flags.writeable


# ---------------------------------------------------------------- preprocessing and weights


def test_preprocess_upsamples_grey_to_three_equal_channels() -> None:
    images = np.zeros((2, 28, 28), np.uint8)
    images[1] = 255
    x = fashion_preprocess(images)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert torch.equal(x[0], torch.full((3, 64, 64), -1.0))
    assert torch.equal(x[1], torch.full((3, 64, 64), 1.0))
    one = fashion_preprocess(read_fashion_split("test")[0][7])
    assert one.shape == (3, 64, 64)
    assert torch.equal(one[0], one[1]) and torch.equal(one[1], one[2])


def test_shipped_weights_match_their_record() -> None:
    record = fashion_record()
    digest = hashlib.sha256(FASHION_CHECKPOINT.read_bytes()).hexdigest()
    assert record["checkpoint"]["sha256"] == digest
    assert record["recipe"]["arch"] == "tf_efficientnet_lite0"
    assert record["recipe"]["train_samples"] == 60000  # the whole training split
    assert record["accuracy_test"] >= 0.92  # the aim, measured on all 10,000 test images


def test_shipped_model_is_accurate_on_a_slice() -> None:
    # the record's accuracy is over all 10,000 test images; 1,000 of them must agree with it
    images, labels = read_fashion_split("test")
    model = load_fashion_backbone()
    with torch.inference_mode():
        predictions = model(fashion_preprocess(images[:1000])).argmax(-1).numpy()
    assert abs((predictions == labels[:1000]).mean() - fashion_record()["accuracy_test"]) < 0.03


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "file not found"), (b"garbage", "not a readable safetensors file")],
)
def test_damaged_weights_name_the_file(tmp_path, monkeypatch, content, message) -> None:
    target = tmp_path / FASHION_CHECKPOINT.name
    if content is not None:
        target.write_bytes(content)
    monkeypatch.setattr(fm, "FASHION_CHECKPOINT", target)
    with pytest.raises(ShippedFileError, match=message) as err:
        load_fashion_backbone()
    assert str(target) in str(err.value) and "reinstall" in str(err.value)


def test_weights_of_another_model_are_refused(tmp_path, monkeypatch) -> None:
    from safetensors.torch import save_file

    target = tmp_path / FASHION_CHECKPOINT.name
    save_file({"weight": torch.zeros(3)}, str(target))
    monkeypatch.setattr(fm, "FASHION_CHECKPOINT", target)
    with pytest.raises(ShippedFileError, match="does not hold tf_efficientnet_lite0 weights"):
        load_fashion_backbone()


# ---------------------------------------------------------------- the workload


def test_fashion_workload_splits_the_test_images_by_seed() -> None:
    w = load_workload("fashion", traffic_size=50, eval_size=30, seed=3)
    assert (w.name, w.labelled, w.num_classes, w.input_size) == ("fashion", True, 10, (3, 64, 64))
    assert not set(w.traffic.order.tolist()) & set(w.evaluation.order.tolist())
    x, y = w.traffic[0]
    row = int(w.traffic.order[0])
    images, labels = read_fashion_split("test")
    assert torch.equal(x, fashion_preprocess(images[row])) and y == labels[row]
    assert torch.equal(w.traffic.labels, torch.from_numpy(labels[w.traffic.order].astype(np.int64)))
    again = load_workload("fashion", traffic_size=50, eval_size=30, seed=3)
    other = load_workload("fashion", traffic_size=50, eval_size=30, seed=4)
    assert np.array_equal(again.traffic.order, w.traffic.order)
    assert not np.array_equal(other.traffic.order, w.traffic.order)
    defaults = load_workload()  # the default workload, default sizes: all 10,000 images
    assert defaults.name == "fashion"
    assert sorted(defaults.traffic.order.tolist() + defaults.evaluation.order.tolist()) == list(
        range(10000)
    )


def test_fashion_workload_refuses_more_images_than_there_are() -> None:
    with pytest.raises(ValueError, match="<= 10000"):
        load_workload("fashion", traffic_size=8000, eval_size=3000)


# ---------------------------------------------------------------- the demo


def test_demo_with_a_damaged_shipped_file_exits_3_naming_it(tmp_path, monkeypatch, capsys) -> None:
    folder = _copy_split(tmp_path)
    (folder / LABELS).write_bytes(b"truncated")
    monkeypatch.setattr(fm, "FASHION_DATA_DIR", folder)
    code = main(["demo", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3
    assert str(folder / LABELS) in err and "reinstall" in err and "Traceback" not in err


def test_demo_refuses_sizes_beyond_the_test_split(tmp_path, capsys) -> None:
    code = main(["demo", "--traffic-size", "9000", "--eval-size", "2000", "--out", str(tmp_path)])
    assert code == 2 and "<= 10000" in capsys.readouterr().err
    assert main(["demo", "--threads", "0", "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_demo_defaults_to_fashion_and_scores_accuracy(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    try:
        code = main(
            ["demo", "--traffic-size", "256", "--eval-size", "128", "--out", str(out),
             "--no-latency", "--no-progress", "--json", "--threads", "1"]
        )  # fmt: skip
        assert torch.get_num_threads() == 1  # --threads pins torch for the run
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stream"]["workload"] == "fashion"
    assert report["learner"]["samples"] == 256
    # labels score the full model: the report's accuracy is the model's on these 128 images
    w = load_workload("fashion", traffic_size=256, eval_size=128)
    x = torch.stack([w.evaluation[i][0] for i in range(128)])
    with torch.inference_mode():
        expected = (w.model(x).argmax(-1) == w.evaluation.labels).float().mean().item()
    assert report["accuracy_full"] == pytest.approx(expected, abs=1e-6)
    assert (out / "demo_fashion.png").stat().st_size > 0


# ---------------------------------------------------------------- samples before the first exit


@pytest.mark.parametrize(("thresholds", "expected"), [(None, None), ((-1.0, -1.0), 0)])
def test_serve_stream_counts_traffic_before_the_first_early_exit(thresholds, expected) -> None:
    from test_distill import quick, stream, toy_wrap

    from earlyexit.distill import OnlineDistiller
    from earlyexit.evaluation.pipeline import serve_stream

    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick(warmup_samples=10_000, recalibrate_every=10_000))
    if thresholds is not None:
        eem.set_thresholds(thresholds)  # every gate open wide: the first batch already exits
    traffic = stream(96, torch.Generator().manual_seed(0))
    stats = serve_stream(learner, traffic, batch_size=32, progress=False)
    assert stats["samples"] == 96
    assert stats["first_early_exit_at"] == expected
