"""Save/load of heads: bit-identical round trips, atomic writes, clear errors on the wrong file."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import FAMILIES, batch
from safetensors.torch import save_file

import earlyexit as ee
from earlyexit import io


def _trained_like(eem: ee.EarlyExitModel) -> ee.EarlyExitModel:
    """Give the heads non-trivial weights and thresholds, as if they had learned something."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in eem.heads.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    eem.set_thresholds([0.3, 0.71234567890123, math.inf, -math.inf][: eem.num_exits])
    return eem


@pytest.mark.parametrize("head", ["linear", "mlp", "conv"])
def test_save_then_load_is_bit_identical(tmp_path, resnet, head):
    eem = _trained_like(ee.wrap(resnet, head=head, input_size=(3, 64, 64)))
    path = tmp_path / "heads.safetensors"
    eem.save(path)
    loaded = ee.load(resnet, path)
    assert loaded.thresholds == eem.thresholds
    assert [e for e in loaded.exits] == [e for e in eem.exits]
    for (k1, v1), (k2, v2) in zip(
        eem.heads.state_dict().items(), loaded.heads.state_dict().items(), strict=True
    ):
        assert k1 == k2 and v1.dtype == v2.dtype and torch.equal(v1, v2)
    x = batch()
    ref, got = eem.predict(x), loaded.predict(x)
    assert torch.equal(ref.logits, got.logits) and torch.equal(ref.exit_index, got.exit_index)


def test_gate_and_supervisor_survive_a_round_trip(tmp_path, resnet):
    eem = ee.wrap(
        resnet,
        gate="margin",
        supervisor=ee.Supervisor("entropy", threshold=-1.5),
        input_size=(3, 64, 64),
    )
    eem.save(tmp_path / "h.safetensors")
    loaded = ee.load(resnet, tmp_path / "h.safetensors")
    assert loaded.gate.name == "margin"
    assert loaded.supervisor.name == "entropy" and loaded.supervisor.threshold == -1.5


def test_loading_onto_another_model_is_a_clear_error(tmp_path, resnet):
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    eem.save(tmp_path / "h.safetensors")
    other_weights = FAMILIES["timm.resnet"][0]().eval()  # same architecture, new random weights
    with torch.no_grad():
        other_weights.fc.weight.add_(1.0)
    with pytest.raises(ee.CheckpointError, match="same architecture but different weights"):
        ee.load(other_weights, tmp_path / "h.safetensors")
    other_arch = FAMILIES["torchvision.resnet"][0]().eval()
    with pytest.raises(ee.CheckpointError, match="different base model architecture"):
        ee.load(other_arch, tmp_path / "h.safetensors")


def test_truncated_foreign_and_missing_files(tmp_path, resnet):
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    path = tmp_path / "h.safetensors"
    eem.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ee.CheckpointError, match="truncated or corrupted"):
        ee.load(resnet, tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ee.CheckpointError, match="not a readable safetensors"):
        ee.load(resnet, tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ee.CheckpointError, match="not an earlyexit checkpoint"):
        ee.load(resnet, tmp_path / "foreign.safetensors")
    with pytest.raises(ee.CheckpointError, match="no checkpoint at"):
        ee.load(resnet, tmp_path / "missing.safetensors")


def test_interrupted_save_leaves_the_previous_file_intact(tmp_path, resnet, monkeypatch):
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    path = tmp_path / "h.safetensors"
    eem.save(path)
    before = path.read_bytes()
    _trained_like(eem)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        eem.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.safetensors"]  # no temp file left


def test_custom_heads_need_their_factory(tmp_path, resnet):
    factory = lambda spec: torch.nn.Linear(spec.channels, spec.num_classes)  # noqa: E731
    eem = ee.wrap(resnet, head=factory, input_size=(3, 64, 64))
    eem.save(tmp_path / "h.safetensors")
    with pytest.raises(ee.CheckpointError, match="custom heads"):
        ee.load(resnet, tmp_path / "h.safetensors")
    loaded = ee.load(resnet, tmp_path / "h.safetensors", head=factory)
    assert torch.equal(loaded.heads[0].module.weight, eem.heads[0].module.weight)


def test_extra_state_rides_along(tmp_path, resnet):
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    io.save_early_exit_model(
        eem, tmp_path / "h.safetensors", {"count": torch.tensor([7])}, {"note": "hi"}
    )
    tensors, config = io.read_checkpoint(tmp_path / "h.safetensors")
    assert torch.equal(tensors["extra.count"], torch.tensor([7]))
    assert config["extra"] == {"note": "hi"}
