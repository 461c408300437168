"""Placement cost model: arithmetic on a hand-made three-site case, search, profiling a real model."""

from __future__ import annotations

import math

import pytest
import torch

import earlyexit as ee
from earlyexit.costs.placement import (
    Link,
    Site,
    StageProfile,
    assignments,
    evaluate_placement,
    heads_paid,
    optimise_placement,
    path_costs,
    sample_costs,
)
from earlyexit.errors import ConfigError
from earlyexit.routing import simulate_exits

# Two exits, three stages of 100/200/300 MACs, heads of 10 and 20 MACs.
PROFILE = StageProfile(
    stage_macs=(100, 200, 300),
    head_macs=(10, 20),
    activation_bytes=(1000, 500),
    input_bytes=2000,
    output_bytes=40,
)
SITES = [
    Site("device", cost_per_mac=4.0, seconds_per_mac=1e-3),
    Site("edge", cost_per_mac=2.0, seconds_per_mac=1e-4),
    Site("cloud", cost_per_mac=1.0, seconds_per_mac=1e-5),
]
LINKS = [
    Link(cost_per_byte=0.1, seconds_per_byte=1e-4, seconds_per_transfer=0.01),
    Link(cost_per_byte=0.2, seconds_per_byte=1e-5, seconds_per_transfer=0.05, cost_per_transfer=3),
]


def test_path_costs_by_hand_on_three_sites():
    costs = path_costs(PROFILE, SITES, LINKS, (0, 1, 2))
    # exit 0: stage0 on device 400 + head0 40 = 440 (answer already on the device).
    # exit 1: + transfer of 1000 B device->edge 100 + stage1 400 + head1 40 + answer back 4 = 984.
    # end:    + transfer of 500 B edge->cloud 100 + 3 + stage2 300 + answer back 8 + 3 + 4.
    assert costs.tolist() == pytest.approx([440.0, 984.0, 440 + 100 + 400 + 40 + 103 + 300 + 15])
    # Without head 0 (closed gate), every path is 40 cheaper from exit 0 on.
    skipped = path_costs(PROFILE, SITES, LINKS, (0, 1, 2), [False, True])
    assert (costs - skipped).tolist() == pytest.approx([40.0, 40.0, 40.0])
    # All in the cloud: the input crosses both links (2000 * 0.1 + 2000 * 0.2 + 3).
    cloud = path_costs(PROFILE, SITES, LINKS, (2, 2, 2), [False, False])
    assert cloud[-1].item() == pytest.approx(603 + 600 + (4 + 8 + 3))


def test_latency_by_hand():
    secs = path_costs(PROFILE, SITES, LINKS, (0, 0, 1), latency=True)
    exit0 = 110 * 1e-3
    exit1 = exit0 + 220 * 1e-3
    end = exit1 + (0.01 + 500 * 1e-4) + 300 * 1e-4 + (0.01 + 40 * 1e-4)
    assert secs.tolist() == pytest.approx([exit0, exit1, end])


def test_sample_costs_and_report():
    exits = torch.tensor([0, 0, 1, 2])
    paid = heads_paid(4, [True, True])
    costs = sample_costs(PROFILE, SITES, LINKS, (0, 1, 2), exits, paid)
    ref = path_costs(PROFILE, SITES, LINKS, (0, 1, 2))
    assert costs.tolist() == pytest.approx(ref[exits].tolist())
    agree = torch.tensor([[True, True], [False, True], [True, True], [True, False]])
    rep = evaluate_placement(
        PROFILE, SITES, LINKS, (0, 1, 2), exits, paid, agree, thresholds=[0.5, math.inf]
    )
    assert rep.expected_cost == pytest.approx(float(ref[exits].mean()))
    assert rep.exit_rates == pytest.approx([0.5, 0.25, 0.25])
    assert rep.agreement == pytest.approx(0.75)  # sample 1 left at exit 0 disagreeing
    # MACs per site: device stage0 100 + head0 10 for all; edge 200 + 20 for half; cloud 300 for 1/4.
    total = 110 + 0.5 * 220 + 0.25 * 300
    assert rep.macs_share_per_site == pytest.approx([110 / total, 110 / total, 75 / total])
    # Bytes: activation 1000 for half, 500 for a quarter; answers back 40 (1 hop) + 40 (2 hops).
    assert rep.bytes_per_sample == pytest.approx(500 + 125 + 0.25 * 40 + 0.25 * 80)
    assert rep.to_dict()["thresholds"] == [0.5, "inf"]
    # Routed samples that skip head 1 pay less.
    skip = paid.clone()
    skip[3, 1] = False
    assert sample_costs(PROFILE, SITES, LINKS, (0, 1, 2), exits, skip)[3] == pytest.approx(
        costs[3] - 40
    )


def test_validation_and_enumeration():
    with pytest.raises(ConfigError, match="non-decreasing"):
        path_costs(PROFILE, SITES, LINKS, (1, 0, 2))
    with pytest.raises(ConfigError, match="links"):
        path_costs(PROFILE, SITES, LINKS[:1], (0, 1, 2))
    with pytest.raises(ConfigError, match="stage_macs"):
        StageProfile((1, 2), (1, 2), (1, 2), 1, 1)
    assert len(assignments(3, 3)) == 10 and (0, 1, 2) in assignments(3, 3)
    assert simulate_exits(torch.tensor([[0.2, 0.9], [0.8, 0.1]]), [0.5, math.inf]).tolist() == [
        2,
        0,
    ]
    assert heads_paid(1, [False, True, False], needs_history=True).tolist() == [[True, True, False]]


def test_optimise_picks_a_cheap_placement_at_target_agreement():
    g = torch.Generator().manual_seed(0)
    n = 4000
    scores = torch.rand(n, 2, generator=g)
    agree = torch.rand(n, 2, generator=g) < 0.7 + 0.3 * scores  # sure heads agree
    best, candidates = optimise_placement(
        PROFILE, SITES, LINKS, scores, agree, target=0.95, confidence=0.9
    )
    assert len(candidates) == 4 * 10  # exit subsets x assignments
    assert best.expected_cost == min(c.expected_cost for c in candidates)
    assert best.agreement >= 0.93  # held-out agreement near or above the target
    closed = [c for c in candidates if not any(c.enabled)]
    assert best.expected_cost < min(c.expected_cost for c in closed)
    fast, _ = optimise_placement(
        PROFILE, SITES, LINKS, scores, agree, target=0.95, objective="latency"
    )
    assert fast.expected_latency_s <= best.expected_latency_s
    budget = (fast.expected_latency_s + best.expected_latency_s) / 2
    slo, cands = optimise_placement(
        PROFILE, SITES, LINKS, scores, agree, target=0.95, max_latency_s=budget
    )
    assert slo.expected_latency_s <= budget
    assert slo.expected_cost == min(
        c.expected_cost for c in cands if c.expected_latency_s <= budget
    )
    impossible, _ = optimise_placement(
        PROFILE, SITES, LINKS, scores, agree, target=0.95, max_latency_s=0.0
    )
    assert impossible.expected_latency_s == fast.expected_latency_s  # none meets it: the fastest


def test_profile_from_a_wrapped_model(resnet):
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    profile = StageProfile.from_model(eem)
    assert sum(profile.stage_macs) == eem.base_macs
    assert profile.head_macs == eem.head_macs
    assert profile.input_bytes == 3 * 64 * 64 * 4 and profile.output_bytes == 10 * 4
    # timm resnet18 at 64x64: layer1 blocks give 64x16x16 float32 features.
    sizes = {p.name: b for p, b in zip(eem.exits, profile.activation_bytes, strict=True)}
    for name, nbytes in sizes.items():
        if name.startswith("layer1"):
            assert nbytes == 64 * 16 * 16 * 4
    on_site = path_costs(profile, [Site("one", 1.0)], [], (0,) * (eem.num_exits + 1))
    assert on_site.tolist() == pytest.approx(
        [float(m) for m in eem.path_macs([0.0] * eem.num_exits)]
    )
