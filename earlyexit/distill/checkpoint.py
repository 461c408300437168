"""Reading a saved learner: the file, the model it must fit, and its learner state record.

The file is an ordinary :class:`~earlyexit.EarlyExitModel` checkpoint (``ee.load`` reads it) with
the learner's tensors under ``extra.`` and its JSON record under ``extra.distill``.

State versions: 1 (every learner saved so far). The record's keys: ``version``, ``config``,
``counters``, ``credit``, ``param_groups``, ``rings``, ``reports``, ``expected_mac_saving``,
``phase``, ``last_loss`` and (since the learner was split into parts) ``recent``, the window
behind the recent exit rates, and (since heads go dormant) ``dormant`` and ``off_streak``,
which older files lack and older readers ignore; tensors ``student.*``, ``opt.*``, ``rng.audit``, ``rng.train``,
``replay.*``, ``evidence.*``, ``gate_data.*``, ``monitor.{e}``, ``pending.*``. Counters added
since version 1 was first written (``_LATER_COUNTER_KEYS``: the traffic's and the schedule's,
e.g. the learning schedule's taper and cost counts) may be absent: older files read defaults.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import expect_dict, expect_int, expect_number, is_int
from ..errors import CheckpointError, ConfigError
from ..io import read_checkpoint
from ..loading import (
    check_base_model,
    check_heads_state,
    check_model_record,
    model_gate,
    restore,
)
from ..model import EarlyExitModel
from .buffers import check_ring_memory, row_bytes, saved_fields
from .calibrator import check_reports
from .config import DistillConfig
from .drift import check_drift_state
from .evidence import check_evidence_state
from .gate_data import check_gate_data_state, gate_data_fields
from .schedule import LATER_KEYS as SCHEDULE_LATER_KEYS
from .schedule import check_phase, check_schedule_state
from .traffic import LATER_KEYS as TRAFFIC_LATER_KEYS
from .traffic import SAVED_KEYS as TRAFFIC_KEYS
from .traffic import check_traffic_state
from .trainer import check_trainer_state

#: Newest learner state version this code writes and reads.
STATE_VERSION = 1
#: Keys of the state record, in the order version 1 writes them.
_RECORD_KEYS = (
    "version",
    "config",
    "counters",
    "credit",
    "param_groups",
    "rings",
    "reports",
    "expected_mac_saving",
    "phase",
    "last_loss",
    "recent",  # added without a version bump: readers of version 1 ignore it, it may be absent
    "dormant",  # these two likewise: exits whose heads stopped training, and the runs behind
    "off_streak",
)
#: Record keys an older file may lack (its reader then uses their defaults).
_OPTIONAL_RECORD_KEYS = ("recent", "dormant", "off_streak")
#: Keys of the ``counters record (several parts count), in the order version 1 writes them.
_COUNTER_KEYS = (
    *TRAFFIC_KEYS,  # samples, exits, audits and MACs, all time and since the last publish
    "train_steps",
    "trained_samples",
    "calibrations",
    "last_calibration",
    "drift_alarms",
    "serve_seconds",
    "learn_seconds",
    "epoch",
)
#: Counters added after version 1 (written since; older files lack them and read them as 0).
_LATER_COUNTER_KEYS = (*TRAFFIC_LATER_KEYS, *SCHEDULE_LATER_KEYS)
_RING_NAMES = ("replay", "evidence", "gate_data")
#: Largest float32: numbers a saved config may hold (the optimizer computes in float32).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: Config fields every saved learner holds (those added since may be absent: their defaults).
_CONFIG_KEYS = (
    "target_agreement",
    "confidence",
    "calibration_method",
    "audit_rate",
    "calibration_fraction",
    "evidence_samples",
    "lr",
    "weight_decay",
    "lr_half_life",
    "temperature",
    "hard_label_weight",
    "batch_size",
    "replay_ratio",
    "replay_samples",
    "max_memory_bytes",
    "storage_dtype",
    "warmup_samples",
    "recalibrate_every",
    "auto_switch_off",
    "min_exit_gain",
    "drift_window",
    "drift_alpha",
    "forget_on_drift",
    "background",
    "seed",
)
#: What the learner's saved tensors are named (``extra.`` removed), by prefix.
_TENSOR_PREFIXES = (
    "student.",
    "opt.",
    "replay.",
    "evidence.",
    "gate_data.",
    "monitor.",
    "pending.",
)
_TENSOR_NAMES = ("rng.audit", "rng.train")
#: Records the parts share, each part adding its own entries.
_SHARED = ("counters", "rings")


def compose_state(
    parts: Sequence[tuple[dict[str, Tensor], dict[str, Any]]],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One learner state from its parts' ``state_dict()`` results: tensors joined; JSON keys
    joined, with the shared ``counters`` and ``rings`` records merged; keys in version 1 order.

    Example:
        >>> tensors, state = compose_state(  # doctest: +SKIP
        ...     [({}, learner_record), traffic.state_dict(), trainer.state_dict(), ...]
        ... )
    """
    tensors: dict[str, Tensor] = {}
    record: dict[str, Any] = {name: {} for name in _SHARED}
    for part_tensors, part_record in parts:
        tensors.update(part_tensors)
        for key, value in part_record.items():
            if key in _SHARED:
                record[key].update(value)
            else:
                record[key] = value
    record["counters"] = {
        key: record["counters"][key] for key in (*_COUNTER_KEYS, *_LATER_COUNTER_KEYS)
    }
    record["rings"] = {
        name: record["rings"][name] for name in _RING_NAMES if name in record["rings"]
    }
    return tensors, {key: record[key] for key in _RECORD_KEYS if key in record}


def check_learner_state(
    tensors: dict[str, Tensor], state: Any, heads: nn.ModuleList, num_classes: int
) -> DistillConfig:
    """Check a whole saved learner (the record and tensors of :func:`compose_state`) before
    anything is loaded or allocated, and return its config. ``heads`` are heads of the saved
    structure (the served ones or the student): the student and its optimizer state must fit
    them, and so must the saved features (one row of each shape is run through a copy).

    Every field is checked: the record's keys, the version, the config, counters (exactly the
    known keys, integers), the rings (fields, dtypes from an allow-list, capacities within the
    config's caps and the memory cap), the monitor windows, pending rows, random states,
    reports and phase. Raises a :class:`~earlyexit.CheckpointError` naming the first bad field.

    Example:
        >>> tensors, state = learner.state_dict()  # doctest: +SKIP
        >>> heads, classes = learner.eem.heads, learner.eem.num_classes  # doctest: +SKIP
        >>> config = check_learner_state(tensors, state, heads, classes)  # doctest: +SKIP
    """
    required = tuple(key for key in _RECORD_KEYS if key not in _OPTIONAL_RECORD_KEYS)
    record = expect_dict(state, "state", required)
    expect_int(record["version"], "version", 1, STATE_VERSION)
    try:
        config = DistillConfig.from_dict(expect_dict(record["config"], "config", _CONFIG_KEYS))
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"field 'config': {err}") from err
    for key, value in record["config"].items():
        # DistillConfig takes any finite number; the optimizer, in float32, and the generators
        # (seeded with seed + 2) do not.
        if isinstance(value, float):
            expect_number(value, f"config.{key}", low=-FLOAT32_MAX, high=FLOAT32_MAX)
        elif is_int(value):
            expect_int(value, f"config.{key}", 0, 2**62)
    num_exits = len(heads)
    expect_dict(record["counters"], "counters", _COUNTER_KEYS, _LATER_COUNTER_KEYS)
    check_traffic_state(record, num_exits)
    check_schedule_state(record)
    check_drift_state(tensors, record, num_exits, config.drift_window)
    check_trainer_state(tensors, record, heads, config, num_classes)
    check_evidence_state(tensors, record, config, num_exits)
    rings = expect_dict(record["rings"], "rings", (), _RING_NAMES)
    learned = config.gate == "learned"
    if ("evidence" in rings) != ("replay" in rings) or (
        "gate_data" in rings and not ("replay" in rings and learned)
    ):
        raise CheckpointError(
            f"field 'rings': saved buffers {sorted(rings)} are not a set this learner builds "
            "(replay and evidence together, gate data with them for a learned gate)"
        )
    z_shapes = None
    if "replay" in rings:
        replay = saved_fields(rings["replay"], "replay")
        evidence = saved_fields(rings["evidence"], "evidence")
        z_shapes = [replay[f"z{i}"][0] for i in range(num_exits)]
        if [evidence[f"z{i}"][0] for i in range(num_exits)] != z_shapes:
            raise CheckpointError(
                "field 'rings': replay and evidence hold features of other shapes"
            )
        _check_features_fit(heads, z_shapes, num_classes)
    if z_shapes is None and any(k.startswith("pending.") for k in tensors):
        raise CheckpointError("pending rows are saved but no buffers are (rows come after them)")
    check_gate_data_state(tensors, record, num_exits, config.gate_samples, z_shapes, num_classes)
    if "replay" in rings:
        layouts = {"replay": replay, "evidence": evidence}
        if "gate_data" in rings:
            layouts["gate_data"] = gate_data_fields(num_exits)
        check_ring_memory(
            config,
            {name: (rings[name]["capacity"], row_bytes(f)) for name, f in layouts.items()},
        )
    check_reports(record["reports"], num_exits)
    expect_number(record["expected_mac_saving"], "expected_mac_saving", high=1.0)
    check_phase(record["phase"])
    for key in tensors:
        if key not in _TENSOR_NAMES and not key.startswith(_TENSOR_PREFIXES):
            raise CheckpointError(f"tensor {key!r} is not part of a saved learner")
    return config


def _check_features_fit(
    heads: nn.ModuleList, z_shapes: list[tuple[int, ...]], num_classes: int
) -> None:
    """Each saved feature shape must be what its head takes: one zero row through a copy of the
    head (the heads themselves stay untouched) must give ``num_classes`` logits."""
    for i, (head, shape) in enumerate(zip(heads, z_shapes, strict=True)):
        probe = copy.deepcopy(head).eval()
        param = next(probe.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        try:
            with torch.no_grad():
                out = probe.classify(torch.zeros((1, *shape), dtype=dtype, device=device))
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise CheckpointError(
                f"field 'rings.replay.fields.z{i}': features of shape {list(shape)} do not fit "
                f"head {i}: {err}"
            ) from None
        if tuple(out.shape) != (1, num_classes):
            raise CheckpointError(
                f"field 'rings.replay.fields.z{i}': head {i} maps features of shape {list(shape)} "
                f"to {tuple(out.shape[1:])} logits, not {num_classes}"
            )


def read_learner_checkpoint(
    model: nn.Module | EarlyExitModel, path: str | Path
) -> tuple[EarlyExitModel, dict[str, Tensor], dict[str, Any]]:
    """The served model, the learner's tensors (``extra.`` prefix removed) and its state record.

    ``model`` is the base classifier (wrapped here as saved) or an :class:`EarlyExitModel` of it
    with the same exits (its heads, gate and thresholds are overwritten with the saved ones).
    Every field of the file is checked (:func:`~earlyexit.io.check_model_record`,
    :func:`check_learner_state`) before anything is changed or allocated: a refused file raises
    :class:`~earlyexit.CheckpointError` naming the field, and leaves ``model`` as it was. Also
    refused: a file without learner state, from a newer version, or saved for another base model
    or other exits.

    Example:
        >>> eem, tensors, state = read_learner_checkpoint(model, "l.safetensors")  # doctest: +SKIP
        >>> state["version"]  # doctest: +SKIP
        1
    """
    where = repr(str(path))
    tensors, config = read_checkpoint(path)
    extra_config = config.get("extra")
    state = extra_config.get("distill") if isinstance(extra_config, dict) else None
    if state is None:
        raise CheckpointError(
            f"{where} holds an EarlyExitModel but no learner state (written by eem.save?): "
            "use eem = ee.load(model, path) and start OnlineDistiller(eem, config)"
        )
    version = state.get("version") if isinstance(state, dict) else None
    if isinstance(version, int) and version > STATE_VERSION:
        raise CheckpointError(
            f"{where} holds learner state v{version}; this earlyexit reads up to "
            f"v{STATE_VERSION} (upgrade earlyexit?)"
        )
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    if isinstance(model, EarlyExitModel):
        eem = model
        try:
            check_model_record(config, tensors)
            gate = model_gate(config)
        except CheckpointError as err:
            raise CheckpointError(f"{where}: {err}") from err
        check_base_model(config["base_model"], eem.base_model, where)
        if [e.name for e in eem.exits] != config["exits"]:
            raise CheckpointError(
                f"{where} has exits {config['exits']}, this model "
                f"{[e.name for e in eem.exits]}: wrap with exits={config['exits']}"
            )
        heads = {k[len("heads.") :]: v for k, v in tensors.items() if k.startswith("heads.")}
        try:
            check_heads_state(eem.heads, heads)
            check_learner_state(extra, state, eem.heads, eem.num_classes)
        except CheckpointError as err:
            raise CheckpointError(f"{where}: {err}") from err
        # Everything checked: now (and only now) change the wrapper.
        eem.heads.load_state_dict(heads, strict=True)
        eem.gate = gate
        eem.set_thresholds(tensors["thresholds"].tolist())
    elif isinstance(model, nn.Module):
        eem = restore(model, tensors, config, path=str(path))
        try:
            check_learner_state(extra, state, eem.heads, eem.num_classes)
        except CheckpointError as err:
            eem.remove()  # leave the model as it was: no hook of a refused wrapper stays
            raise CheckpointError(f"{where}: {err}") from err
    else:
        raise ConfigError(f"expected a model or an EarlyExitModel, got {type(model).__name__}")
    return eem, extra, state
