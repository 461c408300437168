"""One head kind per exit: ``wrap(head=[...])`` builds each exit's head from its own name; the
kinds serve, learn, save and load like a single kind does, and a file whose per-exit kinds lie is
refused before anything is built."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import batch
from test_checkpoint_checks import hooks_on, tamper_record

import earlyexit as ee
from earlyexit import io
from earlyexit.distill import DistillConfig, OnlineDistiller
from earlyexit.heads import ConvHead, LinearHead, MLPHead
from earlyexit.wrapping import _wrap

SIZE = (3, 64, 64)
KINDS = ("linear", "conv", "mlp", "conv")
CLASSES = {"linear": LinearHead, "mlp": MLPHead, "conv": ConvHead}


def _mixed(model: torch.nn.Module, kinds=KINDS) -> ee.EarlyExitModel:
    return ee.wrap(model, head=list(kinds), input_size=SIZE)


def _trained_like(eem: ee.EarlyExitModel) -> ee.EarlyExitModel:
    """Non-trivial head weights and thresholds, as if the heads had learned something."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in eem.heads.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    eem.set_thresholds([0.3, 0.5, math.inf, -math.inf])
    return eem


def test_each_exit_gets_its_own_kind(resnet):
    eem = _mixed(resnet)
    assert eem.head_kinds == KINDS and eem.head_kind == "mixed"
    assert [type(h) for h in eem.heads] == [CLASSES[k] for k in KINDS]
    # Each head is sized as a wrap of that kind alone would size it at that exit.
    uniform = {k: ee.wrap(resnet, head=k, input_size=SIZE) for k in set(KINDS)}
    names = [e.name for e in eem.exits]
    assert all([e.name for e in u.exits] == names for u in uniform.values())
    assert eem.head_macs == tuple(uniform[k].head_macs[i] for i, k in enumerate(KINDS))
    assert eem.head_macs[1] != uniform["linear"].head_macs[1]  # conv costs more than linear
    # The exits' cumulative MACs add this model's own heads.
    spent = 0
    for point, backbone, head in zip(eem.exits, eem.backbone_macs, eem.head_macs, strict=True):
        spent += head
        assert point.macs == backbone + spent


def test_one_name_repeated_is_that_kind(resnet, tmp_path):
    eem = ee.wrap(resnet, head=["conv"] * 4, input_size=SIZE)
    assert eem.head_kind == "conv" and eem.head_kinds == ("conv",) * 4
    eem.save(tmp_path / "h.safetensors")
    _, config = io.read_checkpoint(tmp_path / "h.safetensors")
    assert config["head"] == "conv"  # the layout files had before per-exit kinds


def test_a_plain_string_is_unchanged(resnet):
    eem = ee.wrap(resnet, head="mlp", input_size=SIZE)
    assert eem.head_kind == "mlp" and eem.head_kinds == ("mlp",) * eem.num_exits


def test_serving_leaves_at_the_first_exit(resnet):
    eem = _mixed(resnet)
    eem.set_thresholds([-math.inf, math.inf, math.inf, math.inf])
    res = eem.predict(batch())
    assert torch.equal(res.exit_index, torch.zeros(4, dtype=torch.long))
    assert res.logits.shape == (4, 10)
    # Leaving at the conv exit too.
    eem.set_thresholds([math.inf, -math.inf, math.inf, math.inf])
    assert torch.equal(eem.predict(batch()).exit_index, torch.ones(4, dtype=torch.long))


def test_save_then_load_restores_kinds_and_logits(resnet, tmp_path):
    eem = _trained_like(_mixed(resnet))
    path = tmp_path / "h.safetensors"
    eem.save(path)
    _, config = io.read_checkpoint(path)
    assert config["head"] == list(KINDS)
    loaded = ee.load(resnet, path)
    assert loaded.head_kinds == KINDS and loaded.head_kind == "mixed"
    assert [type(h) for h in loaded.heads] == [type(h) for h in eem.heads]
    assert loaded.thresholds == eem.thresholds
    x = batch(n=8)
    ref, got = eem.predict(x), loaded.predict(x)
    assert torch.equal(ref.logits, got.logits) and torch.equal(ref.exit_index, got.exit_index)
    # Every head answers the same, not only the ones the thresholds let answer.
    for m in (eem, loaded):
        m.set_thresholds([math.inf] * 4)
    _, ref_trace = eem.trace(x)
    _, got_trace = loaded.trace(x)
    for a, b in zip(ref_trace.exits, got_trace.exits, strict=True):
        assert torch.equal(a.z, b.z) and torch.equal(a.logits, b.logits)


def test_custom_inside_a_list_needs_its_factory(resnet, tmp_path):
    factory = lambda spec: torch.nn.Linear(spec.channels, spec.num_classes)  # noqa: E731
    # wrap takes names only in a list; a file may still hold "custom" among names (a wrapper
    # built by hand): loading puts the factory at those exits.
    eem = _wrap(
        resnet, "auto", ["linear", factory, "mlp", "conv"], "max_softmax", None,
        input_size=SIZE, factories_in_list=True,
    )  # fmt: skip
    assert eem.head_kinds == ("linear", "custom", "mlp", "conv")
    _trained_like(eem)
    path = tmp_path / "h.safetensors"
    eem.save(path)
    before = hooks_on(resnet)
    with pytest.raises(ee.CheckpointError, match="custom heads: pass the same factory"):
        ee.load(resnet, path)
    assert hooks_on(resnet) == before
    loaded = ee.load(resnet, path, head=factory)
    assert loaded.head_kinds == eem.head_kinds
    assert torch.equal(loaded.heads[1].module.weight, eem.heads[1].module.weight)
    x = batch()
    assert torch.equal(loaded.predict(x).logits, eem.predict(x).logits)


def test_a_learner_learns_saves_and_loads_with_mixed_heads(resnet, tmp_path):
    eem = _mixed(resnet)
    cfg = DistillConfig(batch_size=8, warmup_samples=10**6, seed=0, train_time_budget=None)
    learner = OnlineDistiller(eem, cfg)
    for seed in range(3):
        assert learner.step(batch(n=8, seed=seed)).logits.shape == (8, 10)
    # Replay holds each exit's z in its head's shape: a vector, or a 4x4 grid for conv heads.
    fields = learner.trainer.replay.fields
    channels = [e.channels for e in eem.exits]
    assert fields["z0"][0] == (channels[0],)
    assert fields["z1"][0] == (channels[1], 4, 4)
    assert fields["z2"][0] == (channels[2],)
    assert len(learner.trainer.replay) > 0
    assert learner.stats()["train_steps"] > 0
    path = tmp_path / "learner.safetensors"
    learner.save(path)
    resumed = OnlineDistiller.load(resnet, path)
    assert resumed.eem.head_kinds == KINDS
    for (k1, v1), (k2, v2) in zip(
        eem.heads.state_dict().items(), resumed.eem.heads.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)
    tensors_a, _ = learner.state_dict()
    tensors_b, _ = resumed.state_dict()
    assert torch.equal(tensors_a["replay.z1"], tensors_b["replay.z1"])
    resumed.step(batch(n=8, seed=9))  # and it keeps learning
    # A plain load of the learner's file is the served model, kinds included.
    assert ee.load(resnet, path).head_kinds == KINDS


@pytest.mark.parametrize(
    ("head", "match"),
    [
        (["linear", "conv"], r"head lists 2 head kind\(s\) for 4 exit\(s\) .*pass 4 head name"),
        ([], "head is an empty list"),
        (["linear", "conv", "nope", "mlp"], "unknown head 'nope'; choose one of"),
        (["linear", 3, "mlp", "conv"], r"head\[1\] is 3: a list of heads holds registered names"),
        (
            ["linear", lambda s: torch.nn.Linear(s.channels, s.num_classes), "mlp", "conv"],
            r"head\[1\] is .*registered names only",
        ),
    ],
)
def test_bad_head_lists_are_clear_errors(resnet, head, match):
    before = hooks_on(resnet)
    with pytest.raises(ee.ConfigError, match=match):
        ee.wrap(resnet, head=head, input_size=SIZE)
    assert hooks_on(resnet) == before


def test_explicit_exits_out_of_order_are_refused_with_differing_kinds(resnet):
    with pytest.raises(ee.ConfigError, match="list the exits in that order"):
        ee.wrap(resnet, exits=["layer2", "layer1"], head=["conv", "linear"], input_size=SIZE)
    # In execution order: each kind where it was listed.
    eem = ee.wrap(resnet, exits=["layer1", "layer2"], head=["conv", "linear"], input_size=SIZE)
    assert [e.name for e in eem.exits] == ["layer1", "layer2"]
    assert [type(h) for h in eem.heads] == [ConvHead, LinearHead]
    # One kind for all: the order does not matter.
    same = ee.wrap(resnet, exits=["layer2", "layer1"], head=["mlp", "mlp"], input_size=SIZE)
    assert same.head_kinds == ("mlp", "mlp")


def test_the_constructor_takes_one_kind_or_one_per_exit(resnet):
    eem = _mixed(resnet)
    fields = dict(
        family=eem.family,
        exits=eem.exits,
        layouts=eem.layouts,
        head_budget=eem.head_budget,
        head_macs=eem.head_macs,
        backbone_macs=eem.backbone_macs,
        base_macs=eem.base_macs,
        gate=eem.gate,
        supervisor=eem.supervisor,
        input_size=eem.input_size,
        fixed_input_size=eem.fixed_input_size,
        num_classes=eem.num_classes,
        candidates=eem.candidates,
    )
    heads = [copy.deepcopy(h) for h in eem.heads]
    one = type(eem)(resnet, heads=heads, head_kind="custom", **fields)
    assert one.head_kinds == ("custom",) * 4 and one.head_kind == "custom"
    one.remove()
    with pytest.raises(ee.ConfigError, match="one string or 4 strings"):
        type(eem)(resnet, heads=heads, head_kind=["linear"], **fields)


def test_copies_keep_the_kinds_and_old_pickles_get_one_kind(resnet):
    eem = _mixed(resnet)
    assert copy.deepcopy(eem).head_kinds == KINDS
    # A wrapper pickled before per-exit kinds held head_kind only: one kind for every exit.
    old = eem.__getstate__()
    old.pop("_head_kinds")
    old["head_kind"] = "linear"
    revived = type(eem).__new__(type(eem))
    revived.__setstate__(old)
    assert revived.head_kinds == ("linear",) * 4 and revived.head_kind == "linear"
    revived.remove()


@pytest.mark.parametrize(
    ("head", "match"),
    [
        (["linear", "conv"], r"field 'head': expected a list of 4 items"),
        (["linear", "conv", 7, "conv"], r"field 'head\[2\]': expected a string, got 7"),
        (3, r"field 'head': expected a head name or a list of 4"),
        (None, r"field 'head': expected a head name or a list of 4"),
    ],
)
def test_a_corrupted_head_list_is_refused_and_changes_nothing(resnet, tmp_path, head, match):
    eem = _trained_like(_mixed(resnet))
    path = tmp_path / "h.safetensors"
    eem.save(path)
    bad = tamper_record(path, tmp_path / "bad.safetensors", lambda r: r.update(head=head))
    weights = {k: v.clone() for k, v in resnet.state_dict().items()}
    before = hooks_on(resnet)
    with pytest.raises(ee.CheckpointError, match=match):
        ee.load(resnet, bad)
    assert hooks_on(resnet) == before
    assert all(torch.equal(v, weights[k]) for k, v in resnet.state_dict().items())
    # Onto an existing wrapper (a learner's resume): its heads and thresholds stay as they were.
    learner = OnlineDistiller(eem, DistillConfig(seed=0, train_time_budget=None))
    learner.save(path)
    bad = tamper_record(path, tmp_path / "bad2.safetensors", lambda r: r.update(head=head))
    heads = copy.deepcopy(eem.heads.state_dict())
    thresholds = eem.thresholds
    with pytest.raises(ee.CheckpointError, match=match):
        OnlineDistiller.load(eem, bad)
    assert eem.thresholds == thresholds
    assert all(torch.equal(v, heads[k]) for k, v in eem.heads.state_dict().items())


def test_a_mixed_file_on_a_wrapper_of_other_kinds_is_refused(resnet, tmp_path):
    learner = OnlineDistiller(_mixed(resnet), DistillConfig(seed=0, train_time_budget=None))
    path = tmp_path / "learner.safetensors"
    learner.save(path)
    linear = ee.wrap(resnet, head="linear", input_size=SIZE)
    with pytest.raises(ee.CheckpointError, match="another head kind"):
        OnlineDistiller.load(linear, path)
    assert linear.head_kinds == ("linear",) * 4


def test_reports_list_each_exits_kind(resnet):
    from earlyexit.evaluation.report import model_meta

    meta = model_meta(_mixed(resnet), "resnet18")
    assert meta["head_kind"] == "mixed" and meta["head_kinds"] == list(KINDS)


def test_profile_shows_each_exits_kind(monkeypatch, capsys):
    from earlyexit._cli import common
    from earlyexit.cli import main

    # The CLI's --head takes one kind; wrap with one per exit behind it.
    monkeypatch.setattr(
        common, "wrap_model", lambda model, args: ee.wrap(model, head=list(KINDS), input_size=SIZE)
    )
    tiny = ["timm:resnet18", "--input-size", "64", "--num-classes", "10"]
    assert main(["profile", *tiny, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["head"] == "mixed" and data["head_kinds"] == list(KINDS)
    assert [e["head"] for e in data["exits"]] == list(KINDS)
    assert main(["profile", *tiny]) == 0
    assert "linear/conv/mlp/conv heads" in capsys.readouterr().out
