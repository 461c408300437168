"""Serving away from the learner: ServingReplica + OnlineDistiller.record/release.

The strongest check is an exact one: one replica (index 0) feeding a synchronous learner, with the
learner's release installed after every batch, is the learner's own ``step`` split in two, so it
must reach bit-identical heads, thresholds, stats and answers.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from test_distill import assert_same, quick, snapshot, stream, toy_wrap

from earlyexit.distill import OnlineDistiller
from earlyexit.distill.replica import HeadsRelease, ServingReplica
from earlyexit.distill.rows import BatchRows
from earlyexit.errors import ConfigError, InputError


def _pair(**config):
    cfg = quick(**config)
    return OnlineDistiller(toy_wrap(), cfg), cfg


def test_one_replica_and_a_learner_equal_the_learners_own_steps():
    whole, _ = _pair()
    split, cfg = _pair()
    replica = ServingReplica(toy_wrap(), cfg, index=0)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    opened = False
    for _ in range(40):
        replica.install(split.release())
        expected = whole.step(stream(32, g1))
        result, rows = replica.serve(stream(32, g2))
        split.record(rows, serve_seconds=0.01)
        assert torch.equal(result.exit_index, expected.exit_index)
        assert torch.equal(result.logits, expected.logits)
        opened = opened or any(t < math.inf for t in replica.eem.thresholds)
    assert opened, "the stream should open a gate, or the comparison proves little"
    # The audit coins were drawn by the replica, not the learner: same draws, other generator.
    assert torch.equal(replica.rng.get_state(), whole.evidence.rng.get_state())
    a, b = snapshot(whole), snapshot(split)
    for tensors in (a[0], b[0]):
        tensors.pop("rng.audit")
    assert_same(a, b)
    stats_whole, stats_split = whole.stats(), split.stats()
    for stats in (stats_whole, stats_split):  # the one wall-clock figure
        stats["learning_cost"].pop("seconds_ratio_total")
    assert stats_whole == stats_split


def test_replicas_serve_whole_releases_only_newer_ones():
    learner, cfg = _pair()
    replica = ServingReplica(toy_wrap(), cfg, index=1)
    assert replica.heads_version == -1
    assert all(t == math.inf for t in replica.eem.thresholds)
    g = torch.Generator().manual_seed(0)
    versions = []
    for _ in range(30):
        _, rows = replica.serve(stream(32, g))
        learner.record(rows, serve_seconds=0.01)
        release = learner.release()
        versions.append(release.version)
        replica.install(release)
        assert replica.eem.heads is release.heads
        assert replica.eem.thresholds == release.thresholds
    assert versions == sorted(versions) and versions[-1] >= 2
    assert learner.heads_version == versions[-1]
    old = HeadsRelease(0, torch.nn.ModuleList(), replica.eem.gate, (), 0.5)
    assert replica.install(old) is False  # an older version only updates the audit share
    assert replica.heads_version == versions[-1] and replica.audit_share == 0.5


def test_a_release_pickles_and_serves_in_another_copy():
    learner, cfg = _pair()
    g = torch.Generator().manual_seed(1)
    replica = ServingReplica(toy_wrap(), cfg)
    for _ in range(30):
        replica.install(learner.release())
        learner.record(replica.serve(stream(32, g))[1], 0.01)
    release = pickle.loads(pickle.dumps(learner.release()))
    other = ServingReplica(toy_wrap(), cfg, index=3)
    other.install(release)
    x = stream(64, torch.Generator().manual_seed(9))
    assert torch.equal(other.eem.predict(x).logits, learner.eem.predict(x).logits)


def test_replicas_draw_different_audits_but_hold_out_the_same_contents():
    _, cfg = _pair()
    a, b = ServingReplica(toy_wrap(), cfg, index=0), ServingReplica(toy_wrap(), cfg, index=1)
    x = stream(256, torch.Generator().manual_seed(2))
    assert torch.equal(a.split.is_calibration(x), b.split.is_calibration(x))
    assert not torch.equal(torch.rand(64, generator=a.rng), torch.rand(64, generator=b.rng))


def test_rows_from_another_model_are_refused_and_change_nothing():
    learner, cfg = _pair()
    g = torch.Generator().manual_seed(3)
    _, rows = ServingReplica(toy_wrap(), cfg).serve(stream(16, g))
    before = snapshot(learner)
    bad = [
        "not rows",
        rows._replace(counts=rows.counts[:-1]),
        rows._replace(audits=[(7, True)]),
        rows._replace(teacher=rows.teacher[:, :2]),
        rows._replace(zs=rows.zs[:1]),
        rows._replace(train=rows.train.float()),
    ]
    for value in bad:
        with pytest.raises(InputError):
            learner.record(value, 0.01)
    for seconds in (-1.0, math.nan, math.inf):
        with pytest.raises(InputError, match="serve_seconds"):
            learner.record(rows, seconds)
    assert_same(before, snapshot(learner))


def test_replica_refuses_bad_batches_and_mismatched_releases():
    learner, cfg = _pair()
    replica = ServingReplica(toy_wrap(), cfg)
    with pytest.raises(InputError):
        replica.serve(torch.zeros(0, 3, 8, 8))
    with pytest.raises(InputError):
        replica.serve(torch.full((2, 3, 8, 8), math.nan))
    with pytest.raises(ConfigError, match="HeadsRelease"):
        replica.install("heads")  # type: ignore[arg-type]
    release = learner.release()
    wrong = HeadsRelease(release.version + 1, release.heads[:1], release.gate, (1.0,), 0.1)
    with pytest.raises(ConfigError, match="exits"):
        replica.install(wrong)
    assert replica.heads_version == -1
    with pytest.raises(ConfigError, match="index"):
        ServingReplica(toy_wrap(), cfg, index=-1)


def test_rows_carry_features_never_images():
    _, cfg = _pair()
    replica = ServingReplica(toy_wrap(), cfg)
    x = stream(16, torch.Generator().manual_seed(4))
    _, rows = replica.serve(x)
    assert isinstance(rows, BatchRows)
    sent = [t for t in (rows.teacher, *rows.zs) if t is not None]
    assert all(t.shape[1:] != x.shape[1:] for t in sent)
    assert all(t.device.type == "cpu" for t in sent)
