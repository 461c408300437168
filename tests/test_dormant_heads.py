"""An exit that never fires must not keep costing: heads switched off calibration after
calibration stop training (issue 14, item 5), wake when they pay again or the traffic moves."""

from __future__ import annotations

import math

import pytest
import torch
from test_distill import quick, run, toy_wrap

from earlyexit.distill import DistillConfig, OnlineDistiller
from earlyexit.distill.learner import TRAIN_MACS_FACTOR
from earlyexit.distill.trainer import check_trainer_state
from earlyexit.errors import CheckpointError, ConfigError


def _switched_off_learner(steps: int = 60) -> OnlineDistiller:
    # The Toy's exit 1 sits after its expensive conv: it saves nothing and is switched off.
    # No MAC budget: every owed step is taken, so training after dormancy can be watched.
    config = quick(dormant_after=2, learn_macs_budget=None)
    learner = OnlineDistiller(toy_wrap(expensive_first=True), config)
    run(learner, steps, torch.Generator().manual_seed(8), same_halves=0.3)
    return learner


def test_streaks_make_heads_dormant_and_wake_them():
    learner = OnlineDistiller(toy_wrap(), quick())
    trainer = learner.trainer
    trainer.note_switched_off([True, False], after=2)
    assert trainer.dormant == frozenset() and trainer.off_streak == [1, 0]
    trainer.note_switched_off([True, False], after=2)
    assert trainer.dormant == {0}
    trainer.note_switched_off([False, True], after=2)  # exit 0 paid again: it wakes
    assert trainer.dormant == frozenset() and trainer.off_streak == [0, 1]
    for _ in range(5):
        trainer.note_switched_off([True, True], after=0)  # 0: never dormant
    assert trainer.dormant == frozenset()
    trainer.note_switched_off([True, True], after=1)
    trainer.wake_all()
    assert trainer.dormant == frozenset() and trainer.off_streak == [0, 0]


def test_a_switched_off_exit_goes_dormant_stops_training_and_costs_nothing():
    learner = _switched_off_learner()
    stats = learner.stats()
    assert stats["exits"][1]["state"] == "switched off"
    assert stats["dormant_exits"] == [1]
    trainer = learner.trainer
    frozen = [p.detach().clone() for p in trainer.student[1].parameters()]
    moving = [p.detach().clone() for p in trainer.student[0].parameters()]
    train_macs = learner.schedule.train_macs
    steps = trainer.train_steps
    run(learner, 4, torch.Generator().manual_seed(9), same_halves=0.3)
    taken = trainer.train_steps - steps
    assert taken > 0
    for before, p in zip(frozen, trainer.student[1].parameters(), strict=True):
        assert torch.equal(before, p)  # the dormant head did not move
    assert any(
        not torch.equal(b, p) for b, p in zip(moving, trainer.student[0].parameters(), strict=True)
    )
    # Learning is charged for exit 0's head only.
    per_row = TRAIN_MACS_FACTOR * learner.eem.head_macs[0]
    rows = learner.config.batch_size
    if trainer.dormant == {1}:  # still dormant after the calibrations of those 4 batches
        assert learner.schedule.train_macs - train_macs == taken * rows * per_row


def test_with_every_head_dormant_a_step_changes_nothing():
    learner = _switched_off_learner()
    trainer = learner.trainer
    trainer.note_switched_off([True, True], after=1)
    assert trainer.dormant == {0, 1}
    before = [p.detach().clone() for p in trainer.student.parameters()]
    steps = trainer.train_steps
    assert trainer.train_step() > 0  # rows were drawn, but no head trains
    assert trainer.train_steps == steps
    for b, p in zip(before, trainer.student.parameters(), strict=True):
        assert torch.equal(b, p)
    assert learner.trainer.active_head_macs(learner.eem.head_macs) == 0


def test_an_alarm_wakes_every_head():
    learner = _switched_off_learner()
    assert learner.trainer.dormant == {1}
    with learner._lock:
        learner._void_evidence(forget=False)
    assert learner.trainer.dormant == frozenset()
    assert learner.stats()["dormant_exits"] == []


def test_dormancy_is_saved_and_checked(tmp_path):
    learner = _switched_off_learner()
    path = tmp_path / "learner.safetensors"
    learner.save(path)
    from test_distill import Toy

    resumed = OnlineDistiller.load(Toy(expensive_first=True).eval(), path)
    assert resumed.trainer.dormant == learner.trainer.dormant == {1}
    assert resumed.trainer.off_streak == learner.trainer.off_streak

    tensors, state = learner.trainer.state_dict()
    student, config = learner.trainer.student, learner.config
    for bad, match in (
        ({"dormant": [2]}, r"dormant\[0\]"),
        ({"dormant": "1"}, "dormant"),
        ({"off_streak": [1]}, "off_streak"),
        ({"off_streak": [0, -1]}, r"off_streak\[1\]"),
    ):
        with pytest.raises(CheckpointError, match=match):
            check_trainer_state(tensors, {**state, **bad}, student, config)
    # A file saved before dormant heads existed: every head trains.
    old = {k: v for k, v in state.items() if k not in ("dormant", "off_streak")}
    check_trainer_state(tensors, old, student, config)
    fresh = OnlineDistiller(toy_wrap(expensive_first=True), quick())
    fresh.trainer.load_state_dict(tensors, old)
    assert fresh.trainer.dormant == frozenset() and fresh.trainer.off_streak == [0, 0]


def test_dormant_after_is_checked():
    with pytest.raises(ConfigError, match="dormant_after"):
        DistillConfig(dormant_after=-1)
    with pytest.raises(ConfigError, match="dormant_after"):
        DistillConfig(dormant_after=1.5)
    assert DistillConfig.from_dict(DistillConfig(dormant_after=0).to_dict()).dormant_after == 0
    learner = OnlineDistiller(toy_wrap(expensive_first=True), quick(dormant_after=0))
    run(learner, 60, torch.Generator().manual_seed(8), same_halves=0.3)
    assert learner.stats()["exits"][1]["state"] == "switched off"
    assert learner.trainer.dormant == frozenset()
    assert math.isfinite(learner.stats()["loss"])
