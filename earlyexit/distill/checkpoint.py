"""Reading a saved learner: the file, the model it must fit, and its learner state record.

The file is an ordinary :class:`~earlyexit.EarlyExitModel` checkpoint (``ee.load`` reads it) with
the learner's tensors under ``extra.`` and its JSON record under ``extra.distill``.

State versions: 1 (every learner saved so far). The record's keys: ``version``, ``config``,
``counters``, ``credit``, ``param_groups``, ``rings``, ``reports``, ``expected_mac_saving``,
``phase``, ``last_loss`` and (since the learner was split into parts) ``recent``, the window
behind the recent exit rates, which older files lack and older readers ignore; tensors ``student.*``, ``opt.*``, ``rng.audit``, ``rng.train``,
``replay.*``, ``evidence.*``, ``gate_data.*``, ``monitor.{e}``, ``pending.*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..gates import make_gate
from ..io import fingerprint, read_checkpoint, restore
from ..model import EarlyExitModel
from .traffic import SAVED_KEYS as TRAFFIC_KEYS

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
)
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
    "non_finite_dropped",  # added later: older files lack it (read as 0)
)
_RING_NAMES = ("replay", "evidence", "gate_data")
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
    record["counters"] = {key: record["counters"][key] for key in _COUNTER_KEYS}
    record["rings"] = {
        name: record["rings"][name] for name in _RING_NAMES if name in record["rings"]
    }
    return tensors, {key: record[key] for key in _RECORD_KEYS if key in record}


def read_learner_checkpoint(
    model: nn.Module | EarlyExitModel, path: str | Path
) -> tuple[EarlyExitModel, dict[str, Tensor], dict[str, Any]]:
    """The served model, the learner's tensors (``extra.`` prefix removed) and its state record.

    ``model`` is the base classifier (wrapped here as saved) or an :class:`EarlyExitModel` of it
    with the same exits (its heads, gate and thresholds are overwritten with the saved ones).
    Raises :class:`~earlyexit.CheckpointError` for a file without learner state, from a newer
    version, or saved for another base model or other exits.

    Example:
        >>> eem, tensors, state = read_learner_checkpoint(model, "l.safetensors")  # doctest: +SKIP
        >>> state["version"]  # doctest: +SKIP
        1
    """
    tensors, config = read_checkpoint(path)
    state = (config.get("extra") or {}).get("distill")
    if state is None:
        raise CheckpointError(
            f"{str(path)!r} holds an EarlyExitModel but no learner state (written by eem.save?): "
            "use eem = ee.load(model, path) and start OnlineDistiller(eem, config)"
        )
    if state.get("version", 0) > STATE_VERSION:
        raise CheckpointError(
            f"{str(path)!r} holds learner state v{state.get('version')}; this earlyexit reads "
            f"up to v{STATE_VERSION} (upgrade earlyexit?)"
        )
    if isinstance(model, EarlyExitModel):
        eem = model
        saved = config.get("base_model", {})
        if saved != fingerprint(eem.base_model):
            raise CheckpointError(
                f"{str(path)!r} was saved for a different base model (architecture or weights "
                "differ): resume on the model it was trained with"
            )
        if [e.name for e in eem.exits] != list(config.get("exits", [])):
            raise CheckpointError(
                f"{str(path)!r} has exits {config.get('exits')}, this model "
                f"{[e.name for e in eem.exits]}: wrap with exits={config.get('exits')}"
            )
        heads = {k[len("heads.") :]: v for k, v in tensors.items() if k.startswith("heads.")}
        try:
            eem.heads.load_state_dict(heads, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{str(path)!r} heads do not fit this model: {err}") from err
        eem.gate = make_gate(config["gate"])
        eem.set_thresholds(tensors["thresholds"].tolist())
    elif isinstance(model, nn.Module):
        eem = restore(model, tensors, config, path=str(path))
    else:
        raise ConfigError(f"expected a model or an EarlyExitModel, got {type(model).__name__}")
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    return eem, extra, state
