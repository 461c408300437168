"""Class-skewed and shifting streams (earlyexit.evaluation.traffic_shapes)."""

from __future__ import annotations

import pytest
import torch

from earlyexit.evaluation.traffic_shapes import (
    ShapedStream,
    class_ranking,
    class_shares,
    dataset_labels,
    zipf_weights,
)


def test_zipf_weights_follow_the_law_and_sum_to_one():
    w = zipf_weights(4, 1.0)
    assert torch.allclose(
        w, torch.tensor([1, 1 / 2, 1 / 3, 1 / 4], dtype=torch.float64) / (25 / 12)
    )
    assert torch.equal(zipf_weights(5, 0.0), torch.full((5,), 0.2, dtype=torch.float64))


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan"), "2"])
def test_zipf_weights_reject_bad_exponents(bad):
    with pytest.raises(ValueError, match="exponent must be a finite number >= 0"):
        zipf_weights(3, bad)


def test_stream_shares_follow_the_ranking_without_repeats():
    labels = torch.arange(10).repeat(1200)  # the top class needs ~1020
    stream = ShapedStream.zipf(labels, length=3000, exponent=1.0, seed=3)
    assert stream.repeats == 0
    assert len(set(stream.indices.tolist())) == 3000  # no sample served twice
    shares = class_shares(labels[stream.indices], 10)
    expected = zipf_weights(10, 1.0)
    ranked = shares[stream.rankings[0]]  # shares in rank order
    assert torch.allclose(ranked, expected, atol=0.03)
    assert stream.rankings[0] == class_ranking(list(range(10)), seed=3)


def test_same_seed_same_stream_other_seed_other_stream():
    labels = torch.arange(5).repeat(40)
    a = ShapedStream.zipf(labels, 100, 1.5, seed=7)
    b = ShapedStream.zipf(labels, 100, 1.5, seed=7)
    c = ShapedStream.zipf(labels, 100, 1.5, seed=8)
    assert torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, c.indices)


def test_repeats_are_counted_exactly_when_a_class_runs_out():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    # Exponent 60: rank 0 takes all but ~1e-18 of the mass, so every draw is the top class.
    stream = ShapedStream.zipf(labels, length=7, exponent=60.0, seed=0, ranking=[0, 1])
    assert labels[stream.indices].tolist() == [0] * 7
    assert stream.repeats == 4  # three fresh samples, then four reuses
    assert sorted(stream.indices[:3].tolist()) == [0, 1, 2]


def test_shift_reverses_the_ranking_at_the_given_position():
    labels = torch.arange(4).repeat(100)
    s = ShapedStream.shifting(labels, 200, 60.0, seed=2, shift_at=120, ranking=[3, 1, 0, 2])
    assert s.segment_starts == [0, 120]
    assert s.rankings == [[3, 1, 0, 2], [2, 0, 1, 3]]
    assert labels[s.indices[:120]].tolist() == [3] * 120
    assert labels[s.indices[120:]].tolist() == [2] * 80
    described = s.describe(labels, 4)
    assert [seg["top_class_share"] for seg in described["segments"]] == [1.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": torch.tensor([], dtype=torch.int64)}, "labels is empty"),
        ({"length": -1}, "length must be an integer >= 0"),
        ({"ranking": [0, 1]}, "ranking must order exactly the classes present"),
        ({"shift_at": 11}, r"shift_at must be an integer in \[0, length=10\]"),
    ],
)
def test_bad_stream_requests_say_what_was_expected(kwargs, message):
    args = {"labels": torch.tensor([0, 1, 2] * 4), "length": 10, "shift_at": None}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ShapedStream.shifting(args.pop("labels"), args.pop("length"), 1.0, seed=0, **args)


def test_dataset_labels_reads_items_or_the_labels_attribute():
    pairs = [(torch.zeros(3, 4, 4), k % 3) for k in range(6)]
    assert dataset_labels(pairs).tolist() == [0, 1, 2, 0, 1, 2]

    class WithLabels(torch.utils.data.Dataset):
        labels = torch.tensor([4, 5])

        def __len__(self):
            return 2

        def __getitem__(self, i):  # never read: the attribute answers
            raise AssertionError("rendered an item")

    assert dataset_labels(WithLabels()).tolist() == [4, 5]
    with pytest.raises(ValueError, match=r"items are \(image, label\)"):
        dataset_labels([torch.zeros(3, 4, 4)])


def test_subset_serves_the_dataset_items_in_stream_order():
    data = [(torch.full((1,), float(k)), k % 2) for k in range(10)]
    stream = ShapedStream.zipf(dataset_labels(data), 6, 0.0, seed=1)
    subset = stream.subset(data)
    assert [int(subset[i][0]) for i in range(6)] == stream.indices.tolist()
