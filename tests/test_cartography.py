"""Data cartography: the meter on hand-made dynamics, regions, the offline driver, router, plot."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import batch

import earlyexit as ee
from earlyexit.cartography import (
    AMBIGUOUS,
    EASY,
    HARD,
    CartographyMeter,
    DifficultyRouter,
    classify_regions,
    plot_data_map,
    train_heads_offline,
)
from earlyexit.errors import ConfigError


def test_meter_on_hand_made_dynamics():
    meter = CartographyMeter(num_exits=2)
    # Three checkpoints. Sample 10: easy at both exits; 20: flips at exit 0; 30: hard; 40 seen once.
    meter.update(torch.tensor([10, 20, 30]), torch.tensor([[0.9, 0.9], [0.1, 0.5], [0.1, 0.2]]))
    meter.update(
        torch.tensor([30, 20, 10]),
        torch.tensor([[0.1, 0.2], [0.9, 0.5], [0.9, 0.9]]),
        correct=torch.tensor([[False, False], [True, False], [True, True]]),
    )
    meter.update(
        torch.tensor([10, 20, 30, 40]),
        torch.tensor([[0.9, 0.9], [0.5, 0.5], [0.1, float("nan")], [0.6, 0.7]]),
    )
    dm = meter.compute()
    assert dm.ids.tolist() == [10, 20, 30, 40]
    assert dm.count.tolist() == [[3, 3], [3, 3], [3, 2], [1, 1]]
    torch.testing.assert_close(
        dm.confidence, torch.tensor([[0.9, 0.9], [0.5, 0.5], [0.1, 0.2], [0.6, 0.7]])
    )
    flip = math.sqrt(((0.1 - 0.5) ** 2 + (0.9 - 0.5) ** 2 + 0.0) / 3)
    torch.testing.assert_close(
        dm.variability,
        torch.tensor([[0.0, 0.0], [flip, 0.0], [0.0, 0.0], [0.0, 0.0]]),
        atol=1e-6,
        rtol=0,
    )
    assert dm.correctness[:3].tolist() == [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]
    assert math.isnan(float(dm.correctness[3, 0]))
    regions = dm.regions(exit=0, ambiguous_quantile=0.75)
    assert regions.tolist() == [EASY, AMBIGUOUS, HARD, EASY]
    conf, _var = dm.summary()
    assert conf.tolist() == pytest.approx([0.9, 0.5, 0.15, 0.65])
    meter.reset()
    assert meter.compute().ids.numel() == 0


def test_meter_validation():
    meter = CartographyMeter(2)
    with pytest.raises(ConfigError, match="repeat"):
        meter.update(torch.tensor([1, 1]), torch.zeros(2, 2))
    with pytest.raises(ConfigError, match=r"\[2, 2\]"):
        meter.update(torch.tensor([1, 2]), torch.zeros(2, 3))


def test_classify_regions_thresholds():
    conf = torch.tensor([0.95, 0.05, 0.6, 0.4, 0.9])
    var = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.4])
    assert classify_regions(conf, var, 0.5, 0.8).tolist() == [0, 2, 0, 2, 1]
    assert classify_regions(conf, var, 0.5, 1.0).tolist() == [0, 2, 0, 2, 0]  # no ambiguous


def test_offline_driver_learns_and_maps_separable_and_noisy_samples():
    g = torch.Generator().manual_seed(0)
    n, k = 300, 3
    labels = torch.randint(0, k, (n,), generator=g)
    centres = torch.randn(k, 8, generator=g) * 3
    z_clean = centres[labels] + 0.3 * torch.randn(n, 8, generator=g)
    z_noise = torch.randn(n, 8, generator=g)  # exit 1 sees nothing useful
    teacher = torch.nn.functional.one_hot(labels, k).float() * 6
    heads, dm = train_heads_offline([z_clean, z_noise], teacher, epochs=5, lr=3e-2)
    assert len(heads) == 2 and dm.count.unique().tolist() == [5]
    conf = dm.confidence
    assert conf[:, 0].mean() > 0.7  # separable: learnt (the mean includes early epochs)
    assert conf[:, 1].mean() < 0.55  # noise: not learnt
    regions = dm.regions(exit=0)
    assert (regions == EASY).float().mean() > 0.6
    assert (dm.regions(exit=1) == HARD).float().mean() > 0.4


def _teacher_class_probability(heads, z, teacher_logits):
    """Per exit, each sample's probability of the teacher's class under ``heads`` (eval mode)."""
    target = teacher_logits.argmax(-1)[:, None]
    with torch.no_grad():
        return torch.stack(
            [
                h.eval().classify(zi).softmax(-1).gather(1, target).squeeze(1)
                for h, zi in zip(heads, z, strict=True)
            ],
            dim=1,
        )


@pytest.mark.slow
def test_offline_driver_with_eem_heads(resnet, tmp_path):
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    x = batch(n=24, seed=4)
    _, trace = eem.trace(x)
    z = [r.z[torch.argsort(r.rows)] for r in trace.exits]
    teacher = trace.final_logits
    untrained = copy.deepcopy(eem.heads)
    before = [p.clone() for p in eem.heads.parameters()]
    heads, dm = train_heads_offline(z, teacher, eem.heads, epochs=3, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(before, eem.heads.parameters(), strict=True))
    assert dm.ids.tolist() == list(range(24))
    assert dm.count.tolist() == [[3] * eem.num_exits] * 24
    # It learnt: at every exit the trained heads give the teacher's class more probability.
    start = _teacher_class_probability(untrained, z, teacher).mean(0)
    end = _teacher_class_probability(heads, z, teacher).mean(0)
    assert (end > start).all(), (start, end)
    # With one checkpoint the data map is exactly that checkpoint's heads on the features.
    heads1, dm1 = train_heads_offline(z, teacher, eem.heads, epochs=1, batch_size=8)
    assert torch.equal(dm1.confidence, _teacher_class_probability(heads1, z, teacher))
    assert torch.equal(dm1.variability, torch.zeros(24, eem.num_exits))
    path = tmp_path / "map.png"
    plot_data_map(dm, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_router_learns_the_hard_region_of_a_data_map():
    # Half the samples sit in clusters of their teacher class (learnable: easy), half are noise
    # with a random teacher class (never learnt: hard), so the map always has both regions.
    g = torch.Generator().manual_seed(0)
    n, k, half = 60, 3, 30
    labels = torch.randint(0, k, (n,), generator=g)
    centres = torch.randn(k, 8, generator=g) * 3
    z = centres[labels] + 0.3 * torch.randn(n, 8, generator=g)
    z[half:] = torch.randn(half, 8, generator=g)
    teacher = torch.nn.functional.one_hot(labels, k).float() * 6
    _, dm = train_heads_offline([z], teacher, epochs=6, lr=3e-2, batch_size=8)
    regions = dm.regions(exit=0)
    hard = regions == HARD
    assert not hard[:half].any() and int((regions[:half] == EASY).sum()) >= half // 2
    assert int(hard[half:].sum()) >= half // 2  # most noise samples are hard
    router = DifficultyRouter().fit(z, hard)
    p = router.predict_proba(z)
    assert p.shape == (n,) and ((p >= 0) & (p <= 1)).all()
    assert p[hard].min() > p[:half].max()  # every hard sample ranks above every clean one
    assert not router.route(z[:half]).any()
    # New samples from the clusters are not sent to the deep end; most new noise samples are.
    fresh = centres[torch.randint(0, k, (40,), generator=g)] + 0.3 * torch.randn(40, 8, generator=g)
    assert not router.route(fresh).any()
    assert router.route(torch.randn(40, 8, generator=g)).float().mean() > 0.5
    with pytest.raises(ConfigError, match="both"):
        DifficultyRouter().fit(z, torch.zeros(n, dtype=torch.bool))
