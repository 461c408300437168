"""The learning schedule: optimizer steps owed in samples (never wall-clock), learning hard until
the heads' fresh loss flattens, tapering to a steady-state ratio, hard again after a drift alarm;
and the learning cost in MACs next to the MACs served."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_distill import assert_same, snapshot, stream, toy_wrap

from earlyexit.distill import DistillConfig, OnlineDistiller
from earlyexit.distill import learner as learner_module
from earlyexit.distill.drift import DriftAlarm
from earlyexit.distill.schedule import LATER_KEYS, MAX_TAPER, Schedule
from earlyexit.errors import CheckpointError, ConfigError


def config(**kwargs) -> DistillConfig:
    """Default learning knobs (no wall-clock cap), a toy-sized target and schedule; no MAC cap
    either (the toy's heads are large next to its backbone), unless a test sets one."""
    base = dict(
        learn_macs_budget=None,
        target_agreement=0.95,
        confidence=0.9,
        warmup_samples=256,
        recalibrate_every=256,
        lr=2e-2,
        batch_size=16,
        seed=0,
    )
    base.update(kwargs)
    return DistillConfig(**base)


class Clock:
    """A stand-in for the ``time`` module the learner reads: every call advances by ``tick``."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now

    thread_time = perf_counter  # learning work is timed in the CPU time of its thread


# ---------------------------------------------------------------------------------------- config
def test_learning_is_scheduled_in_samples_by_default():
    cfg = DistillConfig()
    assert cfg.train_time_budget is None
    assert cfg.warmup_replay_ratio > cfg.replay_ratio


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("warmup_replay_ratio", 0),
        ("warmup_replay_ratio", -1.0),
        ("warmup_replay_ratio", math.inf),
        ("warmup_replay_ratio", "64"),
        ("warmup_replay_ratio", True),
        ("plateau_window", 0),
        ("plateau_window", 2.5),
        ("plateau_window", True),
        ("plateau_tolerance", -0.1),
        ("plateau_tolerance", 1.5),
        ("plateau_tolerance", math.nan),
        ("plateau_tolerance", None),
    ],
)
def test_bad_schedule_knobs_are_refused_by_name(field, bad):
    with pytest.raises(ConfigError, match=field):
        DistillConfig(**{field: bad})


def test_schedule_knobs_round_trip_and_old_configs_read_the_defaults():
    cfg = DistillConfig(
        warmup_replay_ratio=100.0, plateau_window=64, plateau_tolerance=0.0, replay_ratio=2.0
    )
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    saved = DistillConfig().to_dict()
    for key in ("warmup_replay_ratio", "plateau_window", "plateau_tolerance"):
        del saved[key]
    old = DistillConfig.from_dict({**saved, "replay_ratio": 200.0})  # above the warm-up default
    assert old.plateau_window == 256 and old.plateau_tolerance == 0.02
    # A warm-up ratio below the steady one is a flat schedule, not an error (old files load).
    assert Schedule().replay_ratio(old.warmup_replay_ratio, old.replay_ratio) == 200.0


# ---------------------------------------------------------------------------------------- schedule
def test_the_replay_ratio_halves_per_plateau_window_down_to_the_steady_ratio():
    schedule = Schedule()
    ratios = []
    # Window means: first (best), progress, flat (taper), progress, flat, flat, flat, flat.
    for mean in (1.0, 0.8, 0.79, 0.5, 0.5, 0.49, 0.6, 0.5):
        schedule.observe(loss_sum=mean * 10, rows=10, window=10, tolerance=0.05)
        ratios.append(schedule.replay_ratio(warmup=64.0, steady=4.0))
    assert ratios == [64.0, 64.0, 32.0, 32.0, 16.0, 8.0, 4.0, 4.0]
    assert schedule.best_loss == pytest.approx(0.49) and schedule.taper == 5
    schedule.restart_learning()  # a drift alarm
    assert schedule.replay_ratio(64.0, 4.0) == 64.0 and schedule.best_loss is None


def test_a_window_closes_once_it_holds_enough_rows_and_ignores_non_finite_losses():
    schedule = Schedule()
    schedule.observe(60.0, rows=60, window=100, tolerance=0.1)
    schedule.observe(math.nan, rows=50, window=100, tolerance=0.1)  # left out
    assert (schedule.window_rows, schedule.best_loss) == (60, None)
    schedule.observe(60.0, rows=60, window=100, tolerance=0.1)
    assert (schedule.window_rows, schedule.best_loss) == (0, 1.0)
    for _ in range(2 * MAX_TAPER):
        schedule.observe(1.0, rows=100, window=100, tolerance=0.0)
    assert schedule.taper == MAX_TAPER  # bounded, the ratio long at its floor


def test_steps_follow_the_schedule_exactly_warm_up_taper_and_drift(monkeypatch):
    """Each stored row owes ratio / batch_size steps at the ratio in force after its window;
    every owed step is taken after the batch (synchronous)."""
    cfg = config(
        gate="fixed",  # rows go straight to replay, probed batch by batch
        warmup_samples=10**6,  # no calibration: only the schedule acts
        warmup_replay_ratio=64.0,
        replay_ratio=4.0,
        plateau_window=1,  # every batch closes a window
    )
    learner = OnlineDistiller(toy_wrap(), cfg)
    # A flat fresh loss: the first window is the best, every later one a plateau.
    monkeypatch.setattr(learner.trainer, "fresh_loss", lambda logits, teacher: 1.0 * len(teacher))
    g = torch.Generator().manual_seed(0)
    owed, stored = 0.0, 0
    per_row = [4.0, 2.0, 1.0, 0.5, 0.25, 0.25]  # 64, 32, 16, 8, 4 (floor), 4 over batch 16
    for rate in per_row:
        learner.step(stream(32, g))
        rows = learner.trainer.trained_samples - stored
        stored += rows
        assert rows > 0
        owed += rows * rate
        assert learner.trainer.train_steps == math.floor(owed)
        assert learner.stats()["replay_ratio"] == rate * 16
    with learner._lock:  # a drift alarm: learn hard again
        learner._on_drift(DriftAlarm(exit=-1, n=100, failures=50))
    assert learner.stats()["replay_ratio"] == 64.0
    steps = learner.trainer.train_steps
    learner.step(stream(32, g))
    rows = learner.trainer.trained_samples - stored
    # Rows stored after the alarm owe the warm-up rate (the replay was dropped: credit restarts).
    assert learner.trainer.train_steps - steps == math.floor(rows * 4.0)


def test_learned_gate_rows_are_measured_when_flushed_and_taper_a_real_learner():
    learner = OnlineDistiller(toy_wrap(), config(plateau_window=64, warmup_samples=10**6))
    g = torch.Generator().manual_seed(1)
    ratios = []
    for _ in range(40):
        learner.step(stream(64, g))
        ratios.append(learner.stats()["replay_ratio"])
    # The toy is learned within a few windows: the ratio leaves the warm-up value and only falls.
    warm = learner.config.warmup_replay_ratio
    assert ratios[0] == warm and ratios[-1] < warm
    assert all(b <= a for a, b in itertools.pairwise(ratios))
    assert learner.schedule.best_loss is not None


# ---------------------------------------------------------------------------------------- determinism
def learn(tick: float, monkeypatch, background: bool = False) -> OnlineDistiller:
    monkeypatch.setattr(learner_module, "time", Clock(tick))
    learner = OnlineDistiller(toy_wrap(), config())
    g = torch.Generator().manual_seed(2)
    for _ in range(14):
        learner.step(stream(64, g))
    return learner


def test_same_stream_same_heads_on_a_slow_or_a_fast_machine(monkeypatch):
    slow = learn(5.0, monkeypatch)  # every clock read 5 s later: learning looks very costly
    fast = learn(1e-7, monkeypatch)
    assert slow.schedule.learn_seconds > 1e3 * fast.schedule.learn_seconds
    assert slow.trainer.train_steps == fast.trainer.train_steps > 100
    assert slow.schedule.calibrations == fast.schedule.calibrations >= 3
    assert any(t < math.inf for t in slow.eem.thresholds)  # gates opened: thresholds compared
    assert_same(snapshot(slow), snapshot(fast))
    a, b = slow.stats(), fast.stats()
    for stats in (a, b):
        stats["learning_cost"].pop("seconds_ratio_total")
    assert a == b


def test_the_opt_in_wall_clock_cap_still_binds(monkeypatch):
    def steps(**kwargs) -> int:
        monkeypatch.setattr(learner_module, "time", Clock(1e-3))
        learner = OnlineDistiller(toy_wrap(), config(**kwargs))
        g = torch.Generator().manual_seed(2)
        for _ in range(6):
            learner.step(stream(64, g))
        return learner.trainer.train_steps

    # Serving reads the clock twice a batch, learning many times: 12% of serving admits only
    # a few of the steps the schedule owes.
    assert steps(train_time_budget=0.12) < steps() / 10


# ---------------------------------------------------------------------------------------- cost
def test_learning_cost_counts_training_and_calibration_macs_against_serving():
    cfg = config(gate="fixed", warmup_samples=10**6, batch_size=8)
    learner = OnlineDistiller(toy_wrap(), cfg)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        learner.step(stream(32, g))
    heads = sum(learner.eem.head_macs)
    cost = learner.stats()["learning_cost"]
    steps, rows = learner.trainer.train_steps, learner.trainer.trained_samples
    assert steps > 0
    # Every step trains a full minibatch (replay holds more than 8 rows from the first batch).
    assert cost["train_macs"] == 3 * 8 * heads * steps
    # No calibration ran: the only calibration work is the student's look at fresh rows.
    assert cost["calibration_macs"] == rows * heads
    assert cost["served_macs"] == learner.traffic.macs
    total = (cost["train_macs"] + cost["calibration_macs"]) / learner.traffic.macs
    assert cost["macs_ratio_total"] == pytest.approx(total)
    assert cost["macs_ratio_recent"] == pytest.approx(total)  # one block so far
    assert cost["seconds_ratio_total"] > 0


def test_calibrations_add_their_scoring_to_the_cost():
    learner = OnlineDistiller(toy_wrap(), config(warmup_samples=128, recalibrate_every=128))
    g = torch.Generator().manual_seed(4)
    before = 0
    for _ in range(4):
        learner.step(stream(64, g))
        before = max(before, learner.schedule.calibration_macs)
    calibrated = learner.schedule.calibration_macs
    with learner._train_lock:
        learner._make_candidate()
    # Heads unchanged since the last calibration and no new evidence: nothing is rescored.
    assert learner.schedule.calibration_macs - calibrated <= learner.schedule.calibration_macs
    assert calibrated > learner.trainer.trained_samples * sum(learner.eem.head_macs)


def test_the_recent_cost_covers_the_current_and_previous_block():
    schedule = Schedule()
    schedule.count_serving(1000, samples=2048)  # block 1 closes
    schedule.count_learning(500)
    schedule.count_serving(1000, samples=2048)  # block 2 closes (holds the 500)
    schedule.count_serving(1000, samples=10)
    schedule.count_learning(10, calibration=True)
    cost = schedule.learning_cost(served_macs=3000)
    assert cost["macs_ratio_recent"] == pytest.approx(510 / 2000)
    assert cost["macs_ratio_total"] == pytest.approx(510 / 3000)
    assert (cost["train_macs"], cost["calibration_macs"]) == (500, 10)
    assert Schedule().learning_cost(0)["macs_ratio_total"] is None


# ---------------------------------------------------------------------------------------- state
def test_the_schedule_survives_save_and_load(tmp_path):
    learner = OnlineDistiller(toy_wrap(), config(plateau_window=32, plateau_tolerance=0.2))
    g = torch.Generator().manual_seed(5)
    for _ in range(10):
        learner.step(stream(64, g))
    assert learner.schedule.taper > 0 and learner.schedule.train_macs > 0
    path = tmp_path / "learner.safetensors"
    learner.save(path)
    resumed = OnlineDistiller.load(toy_wrap().base_model, path)
    assert resumed.schedule == learner.schedule
    # Both go on identically.
    for who in (learner, resumed):
        who.step(stream(64, torch.Generator().manual_seed(6)))
    assert_same(snapshot(learner), snapshot(resumed))


def test_a_learner_saved_before_the_schedule_loads_at_the_warm_up_ratio(tmp_path):
    learner = OnlineDistiller(toy_wrap(), config(plateau_window=32))
    g = torch.Generator().manual_seed(7)
    for _ in range(6):
        learner.step(stream(64, g))
    tensors, state = learner.state_dict()
    for key in LATER_KEYS[1:]:  # as written before the schedule (allowance_seconds is older)
        del state["counters"][key]
    for key in ("warmup_replay_ratio", "plateau_window", "plateau_tolerance"):
        del state["config"][key]
    state["config"]["train_time_budget"] = 0.12  # what such a file holds: the cap stays on
    resumed = OnlineDistiller(toy_wrap(), DistillConfig.from_dict(state["config"]))
    resumed.load_state_dict(tensors, state)
    assert resumed.schedule.taper == 0 and resumed.schedule.best_loss is None
    assert resumed.schedule.train_macs == 0 and resumed.config.train_time_budget == 0.12
    assert resumed.trainer.train_steps == learner.trainer.train_steps


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("taper", -1),
        ("taper", MAX_TAPER + 1),
        ("best_loss", -1.0),
        ("best_loss", "low"),
        ("window_rows", 1.5),
        ("train_macs", -3),
        ("cost_block", [1, 2]),
        ("cost_last_block", [1, 2, -1]),
        ("allowance_macs", -1.0),
        ("allowance_macs", "lots"),
    ],
)
def test_a_bad_saved_schedule_is_refused_by_name(key, bad):
    _, state = Schedule().state_dict()
    state["counters"][key] = bad
    with pytest.raises(CheckpointError, match=key):
        Schedule().load_state_dict({}, state)


def test_a_background_trainer_owes_at_most_the_cap():
    learner = OnlineDistiller(toy_wrap(), config())
    trainer = learner.trainer
    zs = [torch.zeros(4, 3), torch.zeros(4, 3)]
    trainer.build(
        {"z0": ((3,), torch.float32), "z1": ((3,), torch.float32)},
        3,
        16,
        torch.device("cpu"),
    )
    trainer.add(zs, torch.zeros(4, 3), replay_ratio=64.0, max_owed=10.0)
    assert trainer.credit == 10.0
    trainer.credit = 0.0
    trainer.add(zs, torch.zeros(4, 3), replay_ratio=64.0)
    assert trainer.credit == 16.0  # 4 rows x 64 / batch 16


# ---------------------------------------------------------------------------------- MAC budget
@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("learn_macs_budget", 0),
        ("learn_macs_budget", -0.1),
        ("learn_macs_budget", math.nan),
        ("learn_macs_budget", "0.05"),
        ("closed_macs_budget", 0),
        ("closed_macs_budget", math.inf),
        ("closed_macs_budget", None),
    ],
)
def test_bad_mac_budgets_are_refused_by_name(field, bad):
    with pytest.raises(ConfigError, match=field):
        DistillConfig(**{field: bad})


def test_the_mac_budget_is_on_by_default_and_round_trips():
    cfg = DistillConfig()
    assert cfg.learn_macs_budget == 0.05 and cfg.closed_macs_budget == 0.25
    off = DistillConfig(learn_macs_budget=None)
    assert DistillConfig.from_dict(off.to_dict()) == off


def test_a_batch_earns_the_closed_share_for_what_the_full_model_answered():
    learner = OnlineDistiller(toy_wrap(), config(learn_macs_budget=0.05, closed_macs_budget=0.25))
    assert learner._macs_rate([0, 0, 10]) == 0.25  # everything ran to the end
    assert learner._macs_rate([10, 0, 0]) == 0.05  # everything left early
    assert learner._macs_rate([3, 2, 5]) == pytest.approx(0.05 + 0.2 * 0.5)
    low = OnlineDistiller(toy_wrap(), config(learn_macs_budget=0.3, closed_macs_budget=0.1))
    assert low._macs_rate([0, 0, 4]) == 0.3  # a lower closed share reads as the steady one
    assert OnlineDistiller(toy_wrap(), config())._macs_rate([0, 0, 4]) == 0.0


def test_the_mac_budget_bounds_training_by_the_macs_served():
    """While every gate is closed each batch earns closed_macs_budget x its MACs; a step starts
    only while what was learned plus one step fits in what was earned."""
    # Shares small enough to bind next to the toy's tiny heads.
    budgeted = config(
        gate="fixed", warmup_samples=10**6, learn_macs_budget=0.0005, closed_macs_budget=0.002
    )
    learner = OnlineDistiller(toy_wrap(), budgeted)
    free = OnlineDistiller(toy_wrap(), config(gate="fixed", warmup_samples=10**6))
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    step_macs = 3 * budgeted.batch_size * sum(learner.eem.head_macs)
    for _ in range(8):
        learner.step(stream(32, g1))
        free.step(stream(32, g2))
        schedule = learner.schedule
        assert schedule.allowance_macs == pytest.approx(0.002 * learner.traffic.macs)
        learned = schedule.train_macs + schedule.calibration_macs
        # Within what was earned, but for the student's look at this batch's fresh rows (it
        # always runs), and no affordable step was left untaken while steps were owed.
        assert schedule.train_macs <= schedule.allowance_macs
        assert learned + step_macs > schedule.allowance_macs or learner.trainer.credit < 1.0
    assert 0 < learner.trainer.train_steps < free.trainer.train_steps
    cost = learner.stats()["learning_cost"]
    assert cost["macs_ratio_total"] <= 0.002 + 1e-9 + (
        learner.schedule.calibration_macs / learner.traffic.macs
    )


def test_mac_capped_learning_is_the_same_on_a_slow_or_a_fast_machine(monkeypatch):
    def run(tick: float) -> OnlineDistiller:
        monkeypatch.setattr(learner_module, "time", Clock(tick))
        learner = OnlineDistiller(toy_wrap(), config(learn_macs_budget=0.0005))
        g = torch.Generator().manual_seed(9)
        for _ in range(8):
            learner.step(stream(64, g))
        return learner

    slow, fast = run(5.0), run(1e-7)
    assert slow.trainer.train_steps == fast.trainer.train_steps > 0
    assert_same(snapshot(slow), snapshot(fast))


def test_a_learner_saved_before_the_mac_budget_owes_nothing_back():
    learner = OnlineDistiller(toy_wrap(), config(learn_macs_budget=0.05))
    g = torch.Generator().manual_seed(10)
    for _ in range(3):
        learner.step(stream(64, g))
    tensors, state = learner.state_dict()
    del state["counters"]["allowance_macs"]
    resumed = OnlineDistiller(toy_wrap(), learner.config)
    resumed.load_state_dict(tensors, state)
    schedule = resumed.schedule
    assert schedule.allowance_macs == schedule.train_macs + schedule.calibration_macs


def test_a_calibration_counts_only_the_rows_its_heads_have_not_scored():
    # Heads that did not train since the last calibration are scored on the new rows only (the
    # calibrator keeps the others' logits), and learning cost counts exactly that.
    from test_distill import quick, run

    learner = OnlineDistiller(toy_wrap(), quick(gate="fixed", learn_macs_budget=None))
    run(learner, 6, torch.Generator().manual_seed(31))
    learner.calibrate()
    before = learner.schedule.calibration_macs
    learner.calibrate()  # no training, no new rows in between
    assert learner.schedule.calibration_macs == before
    have = len(learner.evidence)
    learner.trainer.train_step()  # the heads change: every row must be scored again
    learner.calibrate()
    per_row = sum(learner.eem.head_macs)
    assert learner.schedule.calibration_macs - before == have * per_row


def test_what_was_scored_is_saved_and_checked():
    schedule = Schedule(scored=[2, 40, 900])
    _, state = schedule.state_dict()
    restored = Schedule()
    restored.load_state_dict({}, state)
    assert restored.scored == [2, 40, 900]
    for bad in ([0, 1], [-2, 0, 0], [0, 0, -1], "x"):
        with pytest.raises(CheckpointError, match="scored"):
            Schedule().load_state_dict({}, {"counters": {**state["counters"], "scored": bad}})
    old = {k: v for k, v in state["counters"].items() if k != "scored"}
    fresh = Schedule()
    fresh.load_state_dict({}, {"counters": old})
    assert fresh.scored == [-1, -1, 0]  # an older file: the next calibration counts every row
