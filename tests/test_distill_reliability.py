"""Online learning under unusual input: half-precision models, non-finite teachers, failed steps.

Uses the ``Toy`` classifier and stream of ``test_distill`` (known behaviour, fast), and a small
random-weight timm ViT for the overflow a real model shows on extreme inputs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_distill import Toy, quick, stream, toy_wrap

import earlyexit as ee
import earlyexit.distill.trainer as trainer_module
from earlyexit.distill import DistillConfig, OnlineDistiller


def full_state(learner: OnlineDistiller) -> tuple[dict[str, torch.Tensor], str, str, tuple, dict]:
    """Everything observable about a learner, clocks included: its saved state, its stats, and
    the heads, gate and thresholds it serves."""
    tensors, state = learner.state_dict()
    tensors = {k: v.clone() for k, v in tensors.items()}
    heads = {k: v.clone() for k, v in learner.eem.heads.state_dict().items()}
    served = repr(learner.eem.gate.config()) + repr(learner.eem.thresholds)
    return tensors, json.dumps(state), json.dumps(learner.stats()), served, heads


def comparable_stats(learner: OnlineDistiller) -> str:
    """The learner's stats as JSON, but the one wall-clock figure (learning over serving time):
    what two learners on the same stream must agree on, figure for figure."""
    stats = learner.stats()
    stats["learning_cost"].pop("seconds_ratio_total")
    return json.dumps(stats)


def assert_identical(a, b) -> None:
    ta, sa, sta, va, ha = a
    tb, sb, stb, vb, hb = b
    assert sa == sb
    assert sta == stb
    assert va == vb
    assert ta.keys() == tb.keys() and ha.keys() == hb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    for key in ha:
        assert torch.equal(ha[key], hb[key]), key


# ---------------------------------------------------------------------------------------- precision
HALF = [torch.float16, torch.bfloat16]


def half_toy(dtype: torch.dtype, before_wrapping: bool) -> ee.EarlyExitModel:
    if before_wrapping:
        torch.manual_seed(0)
        model = Toy().eval().to(dtype)
        return ee.wrap(model, exits=["stage1", "stage2"], input_size=(3, 8, 8))
    return toy_wrap().to(dtype=dtype)


@pytest.mark.parametrize("before_wrapping", [False, True], ids=["cast-after", "cast-before"])
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_half_precision_models_learn_and_open_gates(dtype, before_wrapping):
    eem = half_toy(dtype, before_wrapping)
    learner = OnlineDistiller(eem, quick())
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        res = learner.step(stream(64, g).to(dtype))
        assert res.logits.dtype == dtype
    stats = learner.stats()
    assert stats["samples"] == 12 * 64 and stats["train_steps"] > 0
    assert stats["loss"] is not None and math.isfinite(stats["loss"]) and stats["loss"] < 1.0
    # Float32 master weights and optimizer state; served heads in the model's dtype.
    assert {p.dtype for p in learner.trainer.student.parameters()} == {torch.float32}
    for state in learner.trainer.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32
    assert {p.dtype for p in eem.heads.parameters()} == {dtype}
    assert any(t < math.inf for t in eem.thresholds), stats["exits"]
    # Early answers agree with the full model on fresh traffic.
    x = stream(400, torch.Generator().manual_seed(99)).to(dtype)
    res = eem.predict(x)
    early = res.exit_index < eem.num_exits
    assert early.float().mean() > 0.3
    full = eem.base_model(x).argmax(dim=-1)
    assert (res.logits.argmax(dim=-1) == full)[early].float().mean() > 0.9


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_half_precision_learner_saves_and_resumes_exactly(tmp_path, dtype):
    g_data = torch.Generator().manual_seed(2)
    batches = [stream(64, g_data).to(dtype) for _ in range(12)]
    straight = OnlineDistiller(half_toy(dtype, False), quick())
    for x in batches:
        straight.step(x)

    first = OnlineDistiller(half_toy(dtype, False), quick())
    for x in batches[:6]:
        first.step(x)
    path = tmp_path / "learner.safetensors"
    first.save(path)
    resumed = OnlineDistiller.load(Toy().eval().to(dtype), path)
    assert {p.dtype for p in resumed.eem.heads.parameters()} == {dtype}
    assert {p.dtype for p in resumed.trainer.student.parameters()} == {torch.float32}
    for x in batches[6:]:
        resumed.step(x)
    assert comparable_stats(resumed) == comparable_stats(straight)
    assert resumed.eem.thresholds == straight.eem.thresholds
    for a, b in zip(resumed.eem.heads.parameters(), straight.eem.heads.parameters(), strict=True):
        assert torch.equal(a, b)


def test_float32_student_is_unchanged_for_float32_models():
    learner = OnlineDistiller(toy_wrap(), quick())
    served = dict(learner.eem.heads.named_parameters())
    for name, p in learner.trainer.student.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, served[name])


# ---------------------------------------------------------------------------------------- failures
def _raise(*args, **kwargs):
    raise RuntimeError("injected failure")


# (part, method): where the failing step breaks. Step 8 (samples 449-512) flushes pending gate
# rows, trains and calibrates (the first calibration falls at 512 samples).
FAILURES = [
    ("trainer", "classify"),  # recording the student's view of pending rows
    ("trainer_module", "distillation_loss"),  # a training step, after its replay draw
    ("trainer", "add"),  # letting rows into replay
    ("calibrator", "candidate"),  # calibrating after training
    ("evidence", "add"),  # keeping held-out rows
    ("gate_data", "hold"),  # holding training rows back for the gate's data
    ("schedule", "calibration_due"),  # after the batch is stored and its time counted
]


@pytest.mark.parametrize(("part", "method"), FAILURES, ids=[f"{p}.{m}" for p, m in FAILURES])
def test_a_failed_step_leaves_no_trace(monkeypatch, part, method):
    g_data = torch.Generator().manual_seed(3)
    batches = [stream(64, g_data, same_halves=0.7) for _ in range(10)]
    config = quick(warmup_samples=512, recalibrate_every=512)
    straight = OnlineDistiller(toy_wrap(), config)
    for x in batches:
        straight.step(x)

    learner = OnlineDistiller(toy_wrap(), config)
    for x in batches[:7]:
        learner.step(x)
    before = full_state(learner)
    target = trainer_module if part == "trainer_module" else getattr(learner, part)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        _raise()

    monkeypatch.setattr(target, method, failing)
    with pytest.raises(RuntimeError, match="injected"):
        learner.step(batches[7])
    monkeypatch.undo()
    assert calls, f"{part}.{method} was not reached"
    assert_identical(before, full_state(learner))
    # Retrying the batch continues exactly as if the failed call never happened (no clocks
    # compared: a budget-free config never reads them).
    for x in batches[7:]:
        learner.step(x)
    assert learner.eem.thresholds == straight.eem.thresholds
    assert comparable_stats(straight) == comparable_stats(learner)
    pairs = zip(
        straight.trainer.student.parameters(), learner.trainer.student.parameters(), strict=True
    )
    for p, q in pairs:
        assert torch.equal(p, q)


def test_a_failed_first_step_leaves_a_new_learner(monkeypatch):
    # The first batch allocates the rings: a failure after that leaves none allocated.
    learner = OnlineDistiller(toy_wrap(), quick())
    before = full_state(learner)
    monkeypatch.setattr(learner.evidence, "add", _raise)
    with pytest.raises(RuntimeError, match="injected"):
        learner.step(stream(64, torch.Generator().manual_seed(4)))
    assert learner.trainer.replay is None and learner.evidence.ring is None
    assert_identical(before, full_state(learner))


def test_a_failed_step_keeps_pending_rows(monkeypatch):
    # The case: the student failed on the pending rows, which were already dropped.
    learner = OnlineDistiller(toy_wrap(), quick())
    g = torch.Generator().manual_seed(4)
    while learner.gate_data.pending_rows == 0:  # early on every batch is flushed at once
        learner.step(stream(64, g))
    pending = learner.gate_data.pending_rows
    monkeypatch.setattr(learner.trainer, "classify", _raise)
    with pytest.raises(RuntimeError):
        learner.calibrate()  # flushes first
    assert learner.gate_data.pending_rows == pending


# ---------------------------------------------------------------------------------------- non-finite
def _poison(x: torch.Tensor, rows: slice) -> torch.Tensor:
    """``x`` with ``rows`` replaced by a finite value the Toy model overflows on (its logits are
    10x a mean of the input: 1e38 gives Inf)."""
    x = x.clone()
    x[rows] = 1e38
    return x


def test_full_model_answers_that_are_not_finite_are_flagged():
    eem = toy_wrap()
    x = _poison(stream(8, torch.Generator().manual_seed(5)), slice(2, 5))
    for supervisor in (None, ee.supervisors.Supervisor(threshold=-math.inf)):
        eem.supervisor = supervisor
        res = eem.predict(x)
        assert not torch.isfinite(res.logits[2:5]).all()
        assert res.accepted.tolist() == [True, True, False, False, False, True, True, True]
        assert torch.isnan(res.confidence[2:5]).all()
        res, _trace = eem.trace(x)
        assert res.accepted.tolist() == [True, True, False, False, False, True, True, True]
    eem.supervisor = None
    # Some rows left early: the full model's rows are scattered back, still flagged.
    eem.set_thresholds([-math.inf, math.inf])
    res, _ = eem.trace(x, audit=torch.tensor([False, False, True, True, False, True, True, True]))
    # The overflowing rows' head logits are not finite either: they run to the end, flagged.
    assert res.exit_index.tolist() == [0, 0, 2, 2, 2, 0, 0, 0]
    assert res.accepted.tolist() == [True, True, False, False, False, True, True, True]


@pytest.mark.parametrize("gate", ["patience", "agreement", "max_softmax"])
def test_an_exit_never_answers_with_logits_that_are_not_finite(gate):
    eem = ee.wrap(Toy().eval(), exits=["stage1", "stage2"], input_size=(3, 8, 8), gate=gate)
    x = stream(6, torch.Generator().manual_seed(6))
    eem.set_thresholds([-math.inf, -math.inf])  # every finite score leaves at once
    assert eem.predict(x).exit_index.tolist() == [0] * 6
    with torch.no_grad():
        for p in eem.heads[0].parameters():
            p.fill_(math.nan)
    res = eem.predict(x)
    # The patience and agreement gates score NaN logits as finite numbers: the rows must still
    # go on, and get the next exit's (finite) answer.
    assert res.exit_index.tolist() == [1] * 6
    assert torch.isfinite(res.logits).all() and res.accepted.all()


def test_a_poisoned_batch_never_teaches():
    eem = toy_wrap()
    learner = OnlineDistiller(eem, quick(gate="fixed"))  # rows go straight to replay
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        learner.step(stream(64, g))
    assert learner.trainer.credit < 1.0  # every step owed so far has been taken
    student = {k: v.clone() for k, v in learner.trainer.student.state_dict().items()}
    replay, evidence = len(learner.trainer.replay), len(learner.evidence)
    windows = [list(w) for w in learner.drift.windows]

    res = learner.step(torch.full((16, 3, 8, 8), 1e38))
    assert not res.accepted.any()
    stats = learner.stats()
    assert stats["non_finite_dropped"] == 16
    assert len(learner.trainer.replay) == replay and len(learner.evidence) == evidence
    assert [list(w) for w in learner.drift.windows] == windows
    for k, v in learner.trainer.student.state_dict().items():
        assert torch.equal(v, student[k]), k

    # A batch with a few poisoned rows: only those are dropped and flagged.
    x = _poison(stream(64, g), slice(0, 5))
    res = learner.step(x)
    assert res.accepted.tolist() == [False] * 5 + [True] * 59
    assert learner.stats()["non_finite_dropped"] == 21
    for _ in range(8):
        learner.step(stream(64, g))
    stats = learner.stats()
    assert math.isfinite(stats["loss"]) and stats["loss"] < 1.0
    assert all(torch.isfinite(p).all() for p in learner.trainer.student.parameters())
    assert any(t < math.inf for t in eem.thresholds)


def test_non_finite_features_are_dropped_like_non_finite_teachers():
    # float16 storage: a feature beyond float16's range would be stored as Inf.
    learner = OnlineDistiller(toy_wrap(), quick(storage_dtype="float16"))
    x = stream(16, torch.Generator().manual_seed(8))
    x[:3] = 1e5  # finite logits (1e6), features over float16's 65504
    res = learner.step(x)
    assert res.accepted.all()
    assert learner.stats()["non_finite_dropped"] == 3
    stored = learner.evidence.ring.view()["z0"]
    assert torch.isfinite(stored).all()


def test_the_dropped_count_is_saved_and_older_files_read_it_as_zero(tmp_path):
    learner = OnlineDistiller(toy_wrap(), quick())
    g = torch.Generator().manual_seed(9)
    learner.step(stream(32, g))
    learner.step(_poison(stream(32, g), slice(0, 4)))
    path = tmp_path / "l.safetensors"
    learner.save(path)
    assert OnlineDistiller.load(Toy().eval(), path).stats()["non_finite_dropped"] == 4
    tensors, state = learner.state_dict()
    del state["counters"]["non_finite_dropped"]  # as written before the count existed
    fresh = OnlineDistiller(toy_wrap(), quick())
    fresh.load_state_dict(tensors, state)
    assert fresh.stats()["non_finite_dropped"] == 0


def test_a_vit_that_overflows_on_a_finite_batch_keeps_learning():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8
    ).eval()
    eem = ee.wrap(model, input_size=(3, 32, 32))
    learner = OnlineDistiller(eem, DistillConfig(seed=0, train_time_budget=None, lr=1e-2))
    g = torch.Generator().manual_seed(10)
    learner.step(torch.randn(16, 3, 32, 32, generator=g))
    poison = torch.full((16, 3, 32, 32), 1e38)
    assert not torch.isfinite(model(poison)).all()
    res = learner.step(poison)
    assert not res.accepted.any()
    assert learner.stats()["non_finite_dropped"] == 16
    for _ in range(3):
        learner.step(torch.randn(16, 3, 32, 32, generator=g))
    loss = learner.stats()["loss"]
    assert loss is not None and math.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in learner.trainer.student.parameters())
