"""The learning time budget (earned per served batch, more while every gate is closed) and the
background learner's bookkeeping off the serving thread."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from test_distill import quick, stream, toy_wrap

from earlyexit.distill import DistillConfig, OnlineDistiller
from earlyexit.distill import learner as learner_module
from earlyexit.distill.schedule import Schedule
from earlyexit.errors import BackgroundTrainingError, ConfigError


# ---------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "1", None, True])
def test_closed_time_budget_must_be_a_positive_number(bad):
    with pytest.raises(ConfigError, match="closed_time_budget"):
        DistillConfig(closed_time_budget=bad)


def test_a_saved_config_without_closed_time_budget_reads_the_default():
    saved = DistillConfig().to_dict()
    del saved["closed_time_budget"]
    assert DistillConfig.from_dict(saved).closed_time_budget == 1.0


# ---------------------------------------------------------------------------------------- schedule
def test_schedule_earns_learning_time_at_the_rate_in_force():
    schedule = Schedule()
    schedule.earn(2.0, rate=1.0)
    schedule.earn(10.0, rate=0.1)
    assert schedule.serve_seconds == 12.0 and schedule.allowance_seconds == pytest.approx(3.0)
    schedule.learn_seconds = 2.5
    assert schedule.affordable(0.5) and not schedule.affordable(0.6)


def test_a_schedule_saved_before_the_allowance_earned_budget_times_serving():
    _, state = Schedule(serve_seconds=50.0, learn_seconds=1.0).state_dict()
    del state["counters"]["allowance_seconds"]
    restored = Schedule()
    restored.load_state_dict({}, state, budget=0.12)
    assert restored.allowance_seconds == pytest.approx(6.0)
    restored.load_state_dict({}, state, budget=None)  # no budget: nothing was ever capped
    assert restored.allowance_seconds == 0.0


def test_a_negative_saved_allowance_is_rejected():
    from earlyexit.errors import CheckpointError

    _, state = Schedule().state_dict()
    state["counters"]["allowance_seconds"] = -1.0
    with pytest.raises(CheckpointError, match="allowance_seconds"):
        Schedule().load_state_dict({}, state)


# ---------------------------------------------------------------------------------------- learner
def test_traffic_the_full_model_answers_earns_the_closed_budget_the_rest_the_train_budget():
    config = quick(
        background=True, train_time_budget=0.1, closed_time_budget=3.0, warmup_samples=10**6
    )
    learner = OnlineDistiller(toy_wrap(), config)
    g = torch.Generator().manual_seed(0)
    try:
        learner.step(stream(16, g))
        learner.sync(timeout=30)
        schedule = learner.schedule
        assert schedule.allowance_seconds == pytest.approx(3.0 * schedule.serve_seconds)
        # Every sample leaves at the first exit (audits too, they count where they left): the
        # full model answers none, so the batch earns the plain budget.
        learner.eem.set_thresholds([-1e9, math.inf])
        earned, served = schedule.allowance_seconds, schedule.serve_seconds
        learner.step(stream(16, g))
        learner.sync(timeout=30)
        assert schedule.allowance_seconds - earned == pytest.approx(
            0.1 * (schedule.serve_seconds - served)
        )
    finally:
        learner.close()


def test_the_higher_budget_applies_while_gates_are_closed():
    config = quick(background=True, train_time_budget=0.5, closed_time_budget=0.2)
    learner = OnlineDistiller(toy_wrap(), config)
    try:
        learner.step(stream(16, torch.Generator().manual_seed(0)))
        learner.sync(timeout=30)
        schedule = learner.schedule
        assert schedule.allowance_seconds == pytest.approx(0.5 * schedule.serve_seconds)
    finally:
        learner.close()


def test_synchronous_steps_earn_the_train_budget_and_calibrate_on_schedule():
    config = quick(
        train_time_budget=0.1, closed_time_budget=3.0, warmup_samples=32, recalibrate_every=32
    )
    learner = OnlineDistiller(toy_wrap(), config)
    learner.schedule.learn_seconds = 1e6  # over budget: no training, calibrations still run
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        learner.step(stream(16, g))
    schedule = learner.schedule
    assert schedule.allowance_seconds == pytest.approx(0.1 * schedule.serve_seconds)
    assert schedule.calibrations == 2 and learner.trainer.train_steps == 0


def test_a_due_background_calibration_waits_until_the_budget_allows_it():
    config = quick(background=True, train_time_budget=0.1, warmup_samples=32, recalibrate_every=32)
    learner = OnlineDistiller(toy_wrap(), config)
    g = torch.Generator().manual_seed(1)
    try:
        learner.schedule.learn_seconds = 1e6  # far over budget: nothing may start
        for _ in range(4):
            learner.step(stream(16, g))
        learner.sync(timeout=30)
        assert learner.schedule.calibrations == 0 and learner._calibration_due
        assert learner.trainer.train_steps == 0
        with learner._lock:
            learner.schedule.allowance_seconds = 1e9  # time earned again: the calibration runs
        learner.sync(timeout=30)
        assert learner.schedule.calibrations == 1 and not learner._calibration_due
    finally:
        learner.close()


def test_without_a_budget_calibrations_never_wait():
    config = quick(background=True, warmup_samples=32, recalibrate_every=32)
    learner = OnlineDistiller(toy_wrap(), config)
    try:
        learner.schedule.learn_seconds = 1e6
        g = torch.Generator().manual_seed(2)
        for _ in range(4):
            learner.step(stream(16, g))
            learner.sync(timeout=30)
        assert learner.schedule.calibrations == 2
    finally:
        learner.close()


# ---------------------------------------------------------------------------------------- background
def blocked_recording(learner: OnlineDistiller) -> threading.Event:
    """Make the background thread wait before recording a batch until the event is set."""
    release = threading.Event()
    store = learner._store

    def waiting_store(*args, **kwargs):
        if threading.current_thread().name == "earlyexit-distill":
            release.wait(timeout=30)
        return store(*args, **kwargs)

    learner._store = waiting_store
    return release


def test_background_steps_leave_their_bookkeeping_to_the_worker():
    learner = OnlineDistiller(toy_wrap(), quick(background=True))
    release = blocked_recording(learner)
    g = torch.Generator().manual_seed(3)
    try:
        for _ in range(3):
            learner.step(stream(8, g))
        assert learner.stats()["samples"] == 0  # served, not yet recorded
        release.set()
        learner.sync(timeout=30)
        assert learner.stats()["samples"] == 24
    finally:
        release.set()
        learner.close()


def test_a_lagging_worker_makes_the_serving_thread_record_and_loses_nothing(monkeypatch):
    monkeypatch.setattr(learner_module, "MAX_QUEUED_BATCHES", 2)
    learner = OnlineDistiller(toy_wrap(), quick(background=True))
    release = blocked_recording(learner)
    g = torch.Generator().manual_seed(4)
    try:
        for _ in range(5):
            learner.step(stream(8, g))
        # The worker holds the first two batches (one of them in hand); the rest were recorded
        # by the serving thread rather than queued without bound.
        assert len(learner._queued) == 2
        assert learner.stats()["samples"] == 24
        release.set()
        learner.sync(timeout=30)
        assert learner.stats()["samples"] == 40 and not learner._queued
    finally:
        release.set()
        learner.close()


def test_a_failed_background_recording_surfaces_on_the_next_step():
    learner = OnlineDistiller(toy_wrap(), quick(background=True))

    def broken(*args, **kwargs):
        raise RuntimeError("ring on fire")

    learner._store = broken
    g = torch.Generator().manual_seed(5)
    try:
        with pytest.raises(BackgroundTrainingError, match="ring on fire"):
            for _ in range(200):
                learner.step(stream(8, g))
                learner.worker.join(timeout=0.05)
    finally:
        learner.close()


def test_save_and_close_record_the_batches_served_first(tmp_path):
    learner = OnlineDistiller(toy_wrap(), quick(background=True))
    release = blocked_recording(learner)
    g = torch.Generator().manual_seed(6)
    for _ in range(3):
        learner.step(stream(8, g))
    threading.Timer(0.2, release.set).start()
    path = tmp_path / "learner.safetensors"
    learner.save(path)  # waits for the three batches
    learner.close()
    assert learner.stats()["samples"] == 24
    resumed = OnlineDistiller.load(toy_wrap().base_model, path, background=False)
    assert resumed.stats()["samples"] == 24


def test_the_budget_tapers_with_the_share_the_full_model_answers():
    config = quick(background=True, train_time_budget=0.1, closed_time_budget=2.1)
    learner = OnlineDistiller(toy_wrap(), config)
    try:
        assert learner._budget_rate([0, 0, 4]) == pytest.approx(2.1)  # nothing left early
        assert learner._budget_rate([3, 0, 1]) == pytest.approx(0.1 + 2.0 * 0.25)
        assert learner._budget_rate([2, 2, 0]) == pytest.approx(0.1)  # everything left early
    finally:
        learner.close()
    assert learner._budget_rate([0, 0, 4]) == pytest.approx(0.1)  # synchronous: plain budget


# ---------------------------------------------------------------------------------------- calibrator
def test_recalibrating_unchanged_heads_scores_only_the_new_evidence_rows(monkeypatch):
    import earlyexit.distill.calibrator as calibrator_module
    from earlyexit.distill.trainer import classify_all

    learner = OnlineDistiller(toy_wrap(), quick(evidence_samples=50, warmup_samples=10**6))
    heads, calibrator = learner.eem.heads, learner.calibrator
    scored: list[int] = []

    def counting(heads_, zs):
        scored.append(int(zs[0].shape[0]))
        return classify_all(heads_, zs)

    monkeypatch.setattr(calibrator_module, "classify_all", counting)
    g = torch.Generator().manual_seed(7)
    for _ in range(8):  # the ring of 50 rows fills, then wraps
        learner.step(stream(32, g))
        ring = learner.evidence.ring
        data = learner.evidence.snapshot()
        got = calibrator.evidence_logits(heads, data, ("same heads", ring.head, ring.added))
        want = classify_all(heads, [data["z0"], data["z1"]])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    assert ring.added > 2 * ring.capacity and len(ring) == ring.capacity
    assert max(scored[1:]) < ring.capacity  # only the rows written since were rescored
    calibrator.evidence_logits(heads, data, ("other heads", ring.head, ring.added))
    assert scored[-1] == ring.capacity  # new heads: every row
    calibrator.evidence_logits(heads, data)
    assert scored[-1] == ring.capacity  # no key: every row
