"""The latency harness runs and returns ratios (never asserting on wall-clock values)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES
from torch import nn

import earlyexit as ee
from earlyexit.evaluation.latency import (
    ExitMix,
    ScriptedExitGate,
    TimingStats,
    bench_exit_mixes,
    compare_latency,
    default_mixes,
    fixed_threads,
    stream_latency,
)

SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return FAMILIES["timm.resnet"][0]().eval()


def test_compare_latency_interleaves_and_counts_calls():
    calls: list[str] = []

    def make(name):
        def fn(x):
            calls.append(name)
            return x

        return fn

    stats = compare_latency({"a": make("a"), "b": make("b")}, torch.zeros(2, 3), reps=4, warmup=1)
    warm, timed = calls[:2], calls[2:]
    assert warm == ["a", "b"]
    assert timed == list("abbaabba")  # the first to run rotates
    assert set(stats) == {"a", "b"} and stats["a"].reps == 4 and stats["a"].batch == 2
    assert stats["a"].min_s <= stats["a"].median_s <= stats["a"].p90_s
    with pytest.raises(ValueError):
        compare_latency({"a": make("a")}, torch.zeros(1), reps=0)


def test_timing_stats_percentiles():
    s = TimingStats.from_times([5.0, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0], batch=4)
    assert s.median_s == 5.5 and s.p90_s == 9.0 and s.min_s == 1.0
    assert s.throughput == pytest.approx(4 / 5.5)


def test_fixed_threads_restores():
    before = torch.get_num_threads()
    with fixed_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_exit_mix_plans():
    assert ExitMix("a", (0.5, 0.0, 0.5)).plan(5).tolist() in ([0, 0, 0, 2, 2], [0, 0, 2, 2, 2])
    assert ExitMix("b", (0.0, 1.0, 0.0)).plan(3).tolist() == [1, 1, 1]
    assert [m.name for m in default_mixes(3)] == [
        "closed",
        "all@0",
        "all@1",
        "all@2",
        "half@0",
        "even",
    ]
    with pytest.raises(ValueError):
        ExitMix("bad", (0.5, 0.2))


def test_scripted_gate_forces_the_planned_exits(tiny):
    gate = ScriptedExitGate()
    eem = ee.wrap(tiny, input_size=SIZE, gate=gate)
    mix = ExitMix("mixed", (0.25, 0.0, 0.25, 0.0, 0.5))
    gate.plan = mix.plan(8)
    eem.set_thresholds(gate.thresholds_for(eem.num_exits))
    assert eem.thresholds[1] == math.inf and eem.thresholds[0] == 0.5
    res = eem.predict(torch.randn(8, *SIZE))
    assert torch.equal(res.exit_index, gate.plan)
    eem.remove()


def test_bench_exit_mixes_returns_ratios(tiny):
    rows, eem = bench_exit_mixes(
        tiny, input_size=SIZE, batch_sizes=[1, 4], reps=2, warmup=1, threads=1
    )
    by = {(r.batch, r.mix): r for r in rows}
    e = eem.num_exits
    assert (1, "half@0") not in by and (4, "half@0") in by  # split mixes only for batches > 1
    assert by[(4, "closed")].mac_fraction == 1.0
    assert by[(4, "all@0")].mac_fraction == pytest.approx(
        eem.path_macs([0.5] + [math.inf] * (e - 1))[0] / eem.base_macs
    )
    for r in rows:
        assert r.ratio_median > 0 and math.isfinite(r.ratio_median) and r.throughput_ratio > 0
        assert r.ratio_paired > 0 and math.isfinite(r.ratio_paired)
        assert r.overhead_vs_macs == pytest.approx(r.ratio_paired - r.mac_fraction)
        assert set(r.to_dict()) >= {"mix", "batch", "mac_fraction", "ratio_median", "ratio_p90"}
    eem.remove()
    # The base model is untouched: no hooks left, same answers.
    x = torch.randn(2, *SIZE)
    assert torch.equal(tiny(x), tiny(x))


def test_stream_latency_keys(tiny):
    eem = ee.wrap(tiny, input_size=SIZE)
    eem.set_thresholds([-math.inf] + [math.inf] * (eem.num_exits - 1))
    out = stream_latency(eem, torch.randn(6, *SIZE), batch=3, reps_b1=3, reps_batched=2, warmup=1)
    for key in (
        "latency_ratio_b1",
        "latency_ratio_b1_median",
        "latency_ratio_b1_p90",
        "throughput_ratio",
    ):
        assert out[key] > 0 and math.isfinite(out[key])
    with pytest.raises(ValueError):
        stream_latency(eem, torch.zeros(0, *SIZE))
    eem.remove()


def test_cuda_timer_path_when_available():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA-event timer is exercised only on a GPU")
    net = nn.Linear(16, 16).cuda()
    stats = compare_latency({"a": net}, torch.zeros(4, 16, device="cuda"), reps=3, warmup=1)
    assert stats["a"].median_s > 0


def test_pure_mixes_are_compared_with_the_truncated_backbone(tiny):
    rows, eem = bench_exit_mixes(
        tiny,
        input_size=SIZE,
        batch_sizes=[2],
        reps=1,
        warmup=0,
        mixes=[ExitMix("all@1", (0, 1, 0, 0, 0)), ExitMix("half", (0.5, 0, 0, 0, 0.5))],
    )
    pure, mixed = rows
    assert pure.prefix_ratio is not None and pure.prefix_ratio > 0
    assert pure.overhead_vs_prefix == pytest.approx(pure.ratio_paired - pure.prefix_ratio)
    assert mixed.prefix_ratio is None and mixed.overhead_vs_prefix is None
    eem.remove()
    assert not tiny._forward_hooks and all(not m._forward_hooks for m in tiny.modules())
