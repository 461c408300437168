"""The library on a CUDA device: serving, online learning, persistence and timing.

Skipped without a GPU (CI has none); run on a GPU machine with ``python -m pytest tests/test_cuda.py``.
Every test also checks that the work stayed on the device it was given (no silent CPU fallback).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES, batch
from test_distill import Toy, quick, served_agreement, stream, toy_wrap

import earlyexit as ee
from earlyexit.distill import OnlineDistiller
from earlyexit.evaluation.latency import compare_latency

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")


def cuda_stream(n: int, g: torch.Generator, **kw) -> torch.Tensor:
    return stream(n, g, **kw).to(CUDA)


@pytest.mark.parametrize(
    "family", ["timm.resnet", "timm.vit", "torchvision.resnet", "torchvision.swin"]
)
def test_gates_closed_equals_base_model_on_cuda(family):
    builder, size = FAMILIES[family]
    torch.manual_seed(0)
    model = builder().eval().to(CUDA)
    eem = ee.wrap(model, input_size=size)
    x = batch(size).to(CUDA)
    with torch.no_grad():
        want = model(x)
    assert torch.equal(eem(x), want)
    res = eem.predict(x)
    assert res.logits.device.type == "cuda" and res.exit_index.device.type == "cuda"
    assert torch.equal(res.logits, want)
    assert (res.exit_index == eem.num_exits).all()


def test_open_gates_skip_the_rest_of_the_network_on_cuda():
    builder, size = FAMILIES["timm.resnet"]
    model = builder().eval().to(CUDA)
    eem = ee.wrap(model, input_size=size)
    calls = []
    handle = model.fc.register_forward_hook(lambda *a: calls.append(1))
    try:
        eem.set_thresholds([-math.inf] * eem.num_exits)  # every sample leaves at the first exit
        res = eem.predict(batch(size).to(CUDA))
    finally:
        handle.remove()
    assert (res.exit_index == 0).all() and not calls


def test_online_distillation_learns_and_keeps_its_guarantee_on_cuda():
    eem = toy_wrap(CUDA)
    learner = OnlineDistiller(eem, quick())
    g = torch.Generator().manual_seed(1)
    for _ in range(24):
        res = learner.step(cuda_stream(64, g))
        assert res.logits.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in eem.heads.parameters())
    assert learner.trainer.replay is not None
    assert all(t.device.type == "cuda" for t in learner.trainer.replay.data.values())
    assert any(t < math.inf for t in eem.thresholds), learner.stats()
    agree, rate = served_agreement(eem, cuda_stream(2000, g))
    assert rate > 0.3 and agree >= 0.95


def test_bad_input_on_cuda_leaves_the_learner_untouched():
    learner = OnlineDistiller(toy_wrap(CUDA), quick())
    g = torch.Generator().manual_seed(2)
    learner.step(cuda_stream(64, g))
    before = learner.stats()
    bad = cuda_stream(8, g)
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ee.InputError):
        learner.step(bad)
    with pytest.raises(ee.InputError, match="on cpu but the model is on cuda"):
        learner.step(stream(8, g))
    after = learner.stats()
    assert before["samples"] == after["samples"] and before["train_steps"] == after["train_steps"]


def test_background_training_on_cuda():
    learner = OnlineDistiller(toy_wrap(CUDA), quick(background=True, recalibrate_every=128))
    g = torch.Generator().manual_seed(3)
    try:
        for _ in range(24):
            learner.step(cuda_stream(64, g))
        learner.sync(timeout=120)
    finally:
        learner.close()
    assert learner.stats()["train_steps"] > 0
    assert any(t < math.inf for t in learner.eem.thresholds)


def test_save_on_cuda_load_on_cpu_is_bit_identical(tmp_path):
    learner = OnlineDistiller(toy_wrap(CUDA), quick())
    g = torch.Generator().manual_seed(4)
    for _ in range(12):
        learner.step(cuda_stream(64, g))
    path = tmp_path / "cuda.safetensors"
    learner.save(path)
    torch.manual_seed(0)
    cpu = ee.load(Toy().eval(), path)
    assert cpu.thresholds == learner.eem.thresholds
    for (key, got), want in zip(
        cpu.heads.state_dict().items(), learner.eem.heads.state_dict().values(), strict=True
    ):
        assert got.device.type == "cpu"
        assert torch.equal(got, want.cpu()), key
    resumed = OnlineDistiller.load(Toy().eval().to(CUDA), path)
    assert all(p.device.type == "cuda" for p in resumed.eem.heads.parameters())
    resumed.step(cuda_stream(64, g))


def test_cuda_latency_is_timed_with_events():
    eem = toy_wrap(CUDA)
    x = cuda_stream(32, torch.Generator().manual_seed(5))
    stats = compare_latency({"wrapped": eem, "plain": eem.base_model}, x, reps=5, warmup=2)
    assert set(stats) == {"wrapped", "plain"}
    assert all(s.median_s > 0 and s.reps == 5 for s in stats.values())
