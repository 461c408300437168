"""Checkpoints that lie: every field of a saved model or learner is checked before anything is
built or allocated, and a refused file raises ``CheckpointError`` naming the field, leaving the
model and learner as they were.

Tampered files are made the way an editor would: the safetensors header (8-byte little-endian
length, then JSON) is rewritten, the tensor bytes after it kept as they are.
"""

from __future__ import annotations

import copy
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_distill import Toy, assert_same, quick, run, snapshot, stream, toy_wrap

import earlyexit as ee
from earlyexit.distill import OnlineDistiller, buffers
from earlyexit.distill.drift import DriftMonitor
from earlyexit.distill.traffic import TrafficCounters
from earlyexit.distill.trainer import HeadTrainer
from earlyexit.errors import CheckpointError

Header = dict[str, Any]


# ---------------------------------------------------------------------------------------- helpers
def read_header(path: Path) -> tuple[Header, bytes]:
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def write_header(path: Path, header: Header, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def tamper(src: Path, dst: Path, edit: Callable[[Header], None]) -> Path:
    """Copy ``src`` to ``dst`` with ``edit`` applied to its safetensors header."""
    header, body = read_header(src)
    edit(header)
    write_header(dst, header, body)
    return dst


def tamper_record(src: Path, dst: Path, edit: Callable[[dict], Any]) -> Path:
    """Copy ``src`` with ``edit`` applied to its earlyexit metadata (parsed JSON); when ``edit``
    returns a string, that string is written as the metadata instead."""

    def go(header: Header) -> None:
        record = json.loads(header["__metadata__"]["earlyexit"])
        replaced = edit(record)
        text = replaced if isinstance(replaced, str) else json.dumps(record)
        header["__metadata__"]["earlyexit"] = text

    return tamper(src, dst, go)


def learner_state(record: dict) -> dict:
    return record["extra"]["distill"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A learner saved mid-stream: rings, optimizer state, pending rows and reports all filled."""
    learner = OnlineDistiller(toy_wrap(), quick())
    run(learner, 6, torch.Generator().manual_seed(21), same_halves=0.7)
    path = tmp_path_factory.mktemp("saved") / "learner.safetensors"
    learner.save(path)
    tensors, _ = learner.state_dict()
    assert {"pending.teacher", "replay.z0", "gate_data.agree", "opt.0.exp_avg"} <= set(tensors)
    return path


def hooks_on(model: torch.nn.Module) -> int:
    """Forward hooks attached anywhere in ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------------------------------- the cases
def test_a_huge_replay_capacity_is_refused_before_anything_is_allocated(
    saved, tmp_path, monkeypatch
):
    built: list[int] = []
    real_init = buffers.TensorRing.__init__

    def spy(self, capacity, fields, device="cpu"):
        built.append(int(capacity))
        assert capacity < 10**6, "a ring of the file's capacity was allocated"
        real_init(self, capacity, fields, device)

    monkeypatch.setattr(buffers.TensorRing, "__init__", spy)

    def capacity_only(record):
        learner_state(record)["rings"]["replay"]["capacity"] = 20_000_000

    path = tamper_record(saved, tmp_path / "cap.safetensors", capacity_only)
    with pytest.raises(CheckpointError, match=r"rings\.replay\.capacity.*20000000"):
        OnlineDistiller.load(Toy().eval(), path)

    def capacity_and_config(record):  # the config asks for it too: the memory cap still holds
        learner_state(record)["rings"]["replay"]["capacity"] = 20_000_000
        learner_state(record)["config"]["replay_samples"] = 20_000_000

    path = tamper_record(saved, tmp_path / "cap2.safetensors", capacity_and_config)
    with pytest.raises(CheckpointError, match=r"'rings'.*max_memory_bytes"):
        OnlineDistiller.load(Toy().eval(), path)

    def no_cap_at_all(record):  # no memory cap: never more than this machine has
        state = learner_state(record)
        state["rings"]["replay"]["capacity"] = 10**13
        state["config"]["replay_samples"] = 10**13
        state["config"]["max_memory_bytes"] = None

    path = tamper_record(saved, tmp_path / "cap3.safetensors", no_cap_at_all)
    with pytest.raises(CheckpointError, match=r"'rings'.*this machine"):
        OnlineDistiller.load(Toy().eval(), path)
    assert built == []  # refused before any ring was built


@pytest.mark.parametrize("metadata", ["{not json", "[1, 2]", "7", "null"])
def test_metadata_that_is_not_a_json_object(saved, tmp_path, metadata):
    path = tamper_record(saved, tmp_path / "m.safetensors", lambda record: metadata)
    with pytest.raises(CheckpointError, match="metadata"):
        ee.load(Toy().eval(), path)
    with pytest.raises(CheckpointError, match="metadata"):
        OnlineDistiller.load(Toy().eval(), path)


def test_input_size_that_is_not_a_size(saved, tmp_path):
    for bad in ("abc", [3, 8], [3, 8, "8"], [3, 8, 0], [3, 10**6, 10**6]):
        path = tamper_record(
            saved, tmp_path / "i.safetensors", lambda r, bad=bad: r.__setitem__("input_size", bad)
        )
        with pytest.raises(CheckpointError, match="input_size"):
            ee.load(Toy().eval(), path)
        with pytest.raises(CheckpointError, match="input_size"):
            OnlineDistiller.load(Toy().eval(), path)


@pytest.mark.parametrize("name", ["load", "float64", "Tensor", "int32"])
def test_buffer_dtype_names_come_from_an_allow_list(saved, tmp_path, name):
    def edit(record):
        learner_state(record)["rings"]["replay"]["fields"]["z0"][1] = name

    path = tamper_record(saved, tmp_path / "d.safetensors", edit)
    with pytest.raises(CheckpointError, match=r"rings\.replay\.fields\.z0"):
        OnlineDistiller.load(Toy().eval(), path)


def test_counter_keys_are_exactly_the_known_ones(saved, tmp_path):
    path = tamper_record(
        saved, tmp_path / "c.safetensors", lambda r: learner_state(r)["counters"].update(bogus=1)
    )
    with pytest.raises(CheckpointError, match=r"'counters'.*bogus"):
        OnlineDistiller.load(Toy().eval(), path)
    path = tamper_record(
        saved, tmp_path / "c2.safetensors", lambda r: learner_state(r)["counters"].pop("epoch")
    )
    with pytest.raises(CheckpointError, match=r"'counters'.*epoch"):
        OnlineDistiller.load(Toy().eval(), path)


def test_counters_added_after_version_1_may_be_absent_but_not_wrong(saved, tmp_path):
    # Files written before the non-finite count existed lack it: they load, counting from 0.
    path = tamper_record(
        saved,
        tmp_path / "old.safetensors",
        lambda r: learner_state(r)["counters"].pop("non_finite_dropped"),
    )
    learner = OnlineDistiller.load(Toy().eval(), path)
    assert learner.stats()["non_finite_dropped"] == 0
    path = tamper_record(
        saved,
        tmp_path / "bad.safetensors",
        lambda r: learner_state(r)["counters"].update(non_finite_dropped="many"),
    )
    with pytest.raises(CheckpointError, match="non_finite_dropped"):
        OnlineDistiller.load(Toy().eval(), path)


@pytest.mark.parametrize("bad", ["x", -1, 1.5, True, None, [1]])
def test_samples_must_be_a_count(saved, tmp_path, bad):
    path = tamper_record(
        saved,
        tmp_path / "s.safetensors",
        lambda r: learner_state(r)["counters"].__setitem__("samples", bad),
    )
    with pytest.raises(CheckpointError, match=r"counters\.samples"):
        OnlineDistiller.load(Toy().eval(), path)


@pytest.mark.parametrize("dtype", ["I64", "U8", "BOOL"])
def test_thresholds_redeclared_as_integers(saved, tmp_path, dtype):
    def edit(header):
        entry = header["thresholds"]
        if dtype != "I64":  # one byte per item: shape changes with the dtype
            entry["shape"] = [entry["shape"][0] * 8]
        entry["dtype"] = dtype

    path = tamper(saved, tmp_path / "t.safetensors", edit)
    with pytest.raises(CheckpointError, match="thresholds"):
        ee.load(Toy().eval(), path)
    with pytest.raises(CheckpointError, match="thresholds"):
        OnlineDistiller.load(Toy().eval(), path)


def test_thresholds_of_the_wrong_length_or_nan(tmp_path):
    eem = toy_wrap()
    path = tmp_path / "h.safetensors"
    ee.io.save_checkpoint(path, {**ee.io.model_state(eem)[0], "thresholds": torch.zeros(3)}, {})
    with pytest.raises(CheckpointError):  # not even a model record
        ee.load(Toy().eval(), path)
    tensors, config = ee.io.model_state(eem)
    ee.io.save_checkpoint(path, {**tensors, "thresholds": torch.tensor([0.5, math.nan])}, config)
    with pytest.raises(CheckpointError, match="NaN"):
        ee.load(Toy().eval(), path)
    ee.io.save_checkpoint(path, {**tensors, "thresholds": torch.tensor([0.5])}, config)
    with pytest.raises(CheckpointError, match=r"thresholds.*shape"):
        ee.load(Toy().eval(), path)


def test_heads_redeclared_in_another_dtype_are_refused(tmp_path):
    eem = toy_wrap()
    path = tmp_path / "h.safetensors"
    eem.save(path)
    header, _ = read_header(path)
    key = next(k for k, v in header.items() if k.startswith("heads.") and v["dtype"] == "F32")
    tampered = tamper(path, tmp_path / "t.safetensors", lambda h: h[key].update(dtype="I32"))
    with pytest.raises(CheckpointError, match=key.removeprefix("heads.")):
        ee.load(Toy().eval(), tampered)


def test_a_refused_file_leaves_the_model_and_wrapper_unchanged(saved, tmp_path):
    def bad_phase(record):
        learner_state(record)["phase"] = "sleeping"

    path = tamper_record(saved, tmp_path / "p.safetensors", bad_phase)
    # Onto a base model: no hook of the refused wrapper stays attached.
    model = Toy().eval()
    before = hooks_on(model)
    with pytest.raises(CheckpointError, match="phase"):
        OnlineDistiller.load(model, path)
    assert hooks_on(model) == before
    # Onto an existing wrapper: its heads, gate and thresholds are untouched.
    eem = toy_wrap()
    heads = copy.deepcopy(eem.heads.state_dict())
    gate, thresholds = eem.gate, eem.thresholds
    with pytest.raises(CheckpointError, match="phase"):
        OnlineDistiller.load(eem, path)
    assert eem.gate is gate and eem.thresholds == thresholds
    for key, value in eem.heads.state_dict().items():
        assert torch.equal(value, heads[key])
    # A learner's own load_state_dict: nothing loaded when any part is bad.
    learner = OnlineDistiller(toy_wrap(), quick())
    run(learner, 2, torch.Generator().manual_seed(5))
    mine = snapshot(learner)
    tensors, state = OnlineDistiller.load(Toy().eval(), saved).state_dict()
    state["phase"] = "sleeping"
    with pytest.raises(CheckpointError, match="phase"):
        learner.load_state_dict(tensors, state)
    assert_same(mine, snapshot(learner))
    # Untouched files still load exactly (resume tests in test_distill cover the figures).
    OnlineDistiller.load(Toy().eval(), saved).step(stream(8, torch.Generator().manual_seed(1)))


def test_parts_check_their_own_state_before_loading():
    counters = TrafficCounters.empty(2)
    counters.record_batch([3, 0, 1], spent=40)
    _, state = counters.state_dict()
    state = json.loads(json.dumps(state))
    state["counters"]["samples"] = "x"
    with pytest.raises(CheckpointError, match=r"counters\.samples"):
        counters.load_state_dict({}, state)
    assert counters.samples == 4 and counters.exits == [3, 0, 1]

    monitor = DriftMonitor(1, window=4, target=0.9, alpha=1e-3, pooled=False)
    monitor.record(0, True)
    tensors, state = monitor.state_dict()
    with pytest.raises(CheckpointError, match="drift_window"):
        monitor.load_state_dict({"monitor.0": torch.ones(9, dtype=torch.bool)}, state)
    assert list(monitor.windows[0]) == [True]

    eem = toy_wrap()
    trainer = HeadTrainer(eem.heads, quick(), threading.RLock(), threading.RLock())
    tensors, state = trainer.state_dict()
    weights = copy.deepcopy(trainer.student.state_dict())
    for bad in (
        {**tensors, "rng.train": torch.zeros(5056, dtype=torch.uint8)},  # not an mt19937 state
        {**tensors, "rng.train": torch.zeros(10, dtype=torch.uint8)},
        {**tensors, "opt.9.step": torch.zeros(())},
        {**tensors, **{k: v.to(torch.int32) for k, v in tensors.items() if k.startswith("stud")}},
    ):
        with pytest.raises(CheckpointError):
            trainer.load_state_dict(bad, state)
    for group_edit in ({"maximize": True}, {"fused": True}, {"lr": -1.0}, {"betas": [0.9, 1.5]}):
        groups = [{**state["param_groups"][0], **group_edit}]
        with pytest.raises(CheckpointError, match="param_groups"):
            trainer.load_state_dict(tensors, {**state, "param_groups": groups})
    for key, value in trainer.student.state_dict().items():
        assert torch.equal(value, weights[key])


# ---------------------------------------------------------------------------------------- dtype
def test_heads_saved_in_float32_onto_a_float16_model(tmp_path):
    model = Toy().eval()
    eem = ee.wrap(model, exits=["stage1", "stage2"], input_size=(3, 8, 8))
    with torch.no_grad():
        for p in eem.heads.parameters():
            p.normal_()
    eem.set_thresholds([0.3, math.inf])
    path = tmp_path / "h.safetensors"
    eem.save(path)
    half = Toy().eval().half()  # the same (deterministic) weights, in float16
    with pytest.raises(CheckpointError, match=r"float32.*float16.*eem\.to\(torch\.float16\)"):
        ee.load(half, path)
    assert hooks_on(half) == 0
    # What the message says: load onto the float32 model, then convert the wrapper.
    loaded = ee.load(Toy().eval(), path).to(torch.float16)
    assert all(p.dtype == torch.float16 for p in loaded.heads.parameters())
    assert loaded.thresholds == eem.thresholds
    # Or, knowingly: heads cast to the model's dtype, weights unchecked.
    cast = ee.load(half, path, check_weights=False)
    for (k, got), want in zip(
        cast.heads.state_dict().items(), eem.heads.state_dict().values(), strict=True
    ):
        assert got.dtype == torch.float16 and torch.equal(got, want.half()), k


# ---------------------------------------------------------------------------------------- fuzz
def leaf_paths(value: Any, path: tuple = ()) -> list[tuple]:
    """Every position in a JSON value (containers included), outermost first."""
    paths = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += leaf_paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            paths += leaf_paths(item, (*path, i))
    return paths


def get_at(record: Any, path: tuple) -> Any:
    for key in path:
        record = record[key]
    return record


def set_at(record: Any, path: tuple, value: Any) -> None:
    get_at(record, path[:-1])[path[-1]] = value


def mutations(value: Any) -> list[Any]:
    """Values of another type, or out of range, for a field that holds ``value``."""
    out: list[Any] = [None, "x", -1, 2**70, math.nan, True, [], {}]
    if isinstance(value, list) and value:
        out += [value[:-1], [*value, value[-1]]]
    if isinstance(value, dict):
        out.append({**value, "bogus": 1})
    if isinstance(value, int | float) and not isinstance(value, bool):
        out += [math.inf, 1e300]
    return [m for m in out if not (type(m) is type(value) and m == value)]


def usable(learner: OnlineDistiller) -> None:
    """A learner that loaded must work: no 'loads and fails later'."""
    try:
        json.dumps(learner.stats())
        learner.step(stream(16, torch.Generator().manual_seed(3)))
        learner.stats()
    finally:
        learner.close()


def test_fuzz_every_metadata_field(saved, tmp_path):
    record = json.loads(read_header(saved)[0]["__metadata__"]["earlyexit"])
    tried = 0
    for path in leaf_paths(record)[1:]:
        if path in (("format",), ("format_version",)):
            continue  # refused by the format check, tested with the truncated/foreign files
        for bad in mutations(get_at(record, path)):
            edited = copy.deepcopy(record)
            set_at(edited, path, bad)
            file = tmp_path / "f.safetensors"
            tamper_record(saved, file, lambda r, e=edited: json.dumps(e))
            tried += 1
            is_learner_field = path[0] == "extra"
            for loader in ("learner", "model") if not is_learner_field else ("learner",):
                try:
                    if loader == "learner":
                        usable(OnlineDistiller.load(Toy().eval(), file))
                    else:
                        ee.load(Toy().eval(), file).predict(stream(4, torch.Generator()))
                except CheckpointError:
                    pass
                except Exception as err:  # pragma: no cover - the failure this test looks for
                    raise AssertionError(f"{loader} load of {path} = {bad!r}: {err!r}") from err
    assert tried > 500


def test_fuzz_tensor_declarations(saved, tmp_path):
    header, _ = read_header(saved)
    swaps = {"F32": "I32", "I32": "F32", "F64": "I64", "I64": "F64", "BOOL": "U8", "U8": "BOOL"}
    swaps |= {"F16": "BF16", "BF16": "F16"}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry["shape"]
        edits = [{"dtype": swaps[entry["dtype"]]}]
        if len(shape) >= 2 and shape != shape[::-1]:
            edits.append({"shape": shape[::-1]})
        if len(shape) == 1 and shape[0] % 2 == 0 and shape[0]:
            edits.append({"shape": [2, shape[0] // 2]})
        if not shape:
            edits.append({"shape": [1]})
        for change in edits:
            file = tamper(
                saved, tmp_path / "t.safetensors", lambda h, k=key, c=change: h[k].update(c)
            )
            for load in (
                lambda f: usable(OnlineDistiller.load(Toy().eval(), f)),
                lambda f: ee.load(Toy().eval(), f).predict(stream(4, torch.Generator())),
            ):
                try:
                    load(file)
                except CheckpointError:
                    pass
                except Exception as err:  # pragma: no cover - the failure this test looks for
                    raise AssertionError(f"{key} {change}: {err!r}") from err
