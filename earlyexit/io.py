"""Saving and loading exit heads: one safetensors file, JSON config in its metadata.

Only the heads, thresholds and config are stored, with a fingerprint of the base model (its
architecture, and a hash of its weights), so loading onto another model is a clear error instead of
silently wrong heads. Writes are atomic: the file is written beside the target and renamed over it,
so an interrupted save leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import stat
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor, nn

from ._checks import (
    FLOAT_DTYPES,
    expect_dict,
    expect_int,
    expect_list,
    expect_number,
    expect_str,
    expect_tensor,
    field_error,
    is_int,
    show,
)
from .errors import CheckpointError, ConfigError, UnsupportedModelError
from .gates import Gate, make_gate
from .supervisors import Supervisor, make_supervisor

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (but an open file cannot be deleted there)
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .heads import HeadFactory
    from .model import EarlyExitModel

FORMAT = "earlyexit"
FORMAT_VERSION = 1
_META_KEY = "earlyexit"
#: Bounds on a saved ``input_size``: loading probes the model once at that size, so a file must
#: not be able to ask for an input of gigabytes.
MAX_INPUT_SIDE = 16384
MAX_INPUT_ELEMENTS = 2**26
#: Keys of the model record (:func:`model_state`); ``head_budget`` and ``supervisor`` may be
#: absent, ``extra`` holds the state of whatever saved the model alongside (e.g. a learner).
_MODEL_KEYS = ("family", "exits", "head", "gate", "input_size", "num_classes", "base_model")
_MODEL_OPTIONAL = ("format", "format_version", "head_budget", "supervisor", "extra")


def fingerprint(model: nn.Module) -> dict[str, str]:
    """Hashes of a model's architecture (names, shapes, dtypes) and of its weights' bytes.

    Example:
        >>> fp = fingerprint(torch.nn.Linear(2, 2))
        >>> sorted(fp)
        ['architecture', 'weights']
    """
    arch = hashlib.blake2b(digest_size=16)
    weights = hashlib.blake2b(digest_size=16)
    arch.update(f"{type(model).__module__}.{type(model).__qualname__};".encode())
    for name, tensor in model.state_dict(keep_vars=False).items():
        arch.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        data = tensor.detach().reshape(-1).contiguous().cpu()
        weights.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return {"architecture": arch.hexdigest(), "weights": weights.hexdigest()}


#: A save's temporary file older than this (seconds), that no process holds locked, was left by a
#: save that was killed; the next save of the same target deletes it.
STALE_TEMPORARY_S = 600.0


def checked_target(path: str | os.PathLike[str]) -> Path:
    """``path`` as the file a save writes to; :class:`ConfigError` when it cannot be one.

    Example:
        >>> checked_target("out/heads.safetensors").name
        'heads.safetensors'
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"expected a file path to save to, got {type(path).__name__}")
    text = os.fsdecode(os.fspath(path))
    if not text:
        raise ConfigError("expected a file path to save to, got an empty path")
    target = Path(text)
    if target.name in ("", "..") or target.is_dir():
        raise ConfigError(
            f"{text!r} is a folder; expected a file path to save to, "
            f"e.g. {str(target / 'heads.safetensors')!r}"
        )
    return target


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The bytes go to a temporary ``.NAME.XXXXXXXX.tmp`` beside the target, which is renamed over
    the target once it is on disk. A process killed mid-save leaves its temporary behind; the
    next save of the same target deletes it. A temporary counts as left behind only when it is
    older than :data:`STALE_TEMPORARY_S` *and* no process holds its lock (a writer locks its
    temporary from creation to rename, and a killed process's locks vanish with it), so one
    process never deletes another's save in progress.

    Raises:
        ConfigError: ``path`` is empty or names a folder.

    Example:
        >>> write_atomic("out/data.bin", b"payload")  # doctest: +SKIP
    """
    target = checked_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)  # first: a killed save's leftover may hold the disk space
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            locked = _try_lock(handle.fileno())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            if locked:  # renamed while still locked: no cleaner ever sees it unlocked
                os.replace(tmp, target)
        if not locked:
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on an open file without waiting; ``False`` if another open file
    holds one, or locks are not available here (no ``fcntl``, a filesystem without locks)."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries of ``target`` left behind by killed saves (see :func:`write_atomic`).

    Only names of exactly this target's pattern match: ``.NAME.`` + a dot-free tag + ``.tmp``
    cannot be another target's temporary (its tag would have to contain a dot). Any failure
    leaves the file in place: cleaning up never fails a save.
    """
    pattern = re.compile(re.escape(f".{target.name}.") + r"[A-Za-z0-9_]+\.tmp")
    try:
        names = [e.name for e in os.scandir(target.parent) if pattern.fullmatch(e.name)]
    except OSError:
        return
    now = time.time()
    for name in names:
        with contextlib.suppress(OSError):
            _remove_if_stale(target.parent / name, now)


def _remove_if_stale(path: Path, now: float) -> None:
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < STALE_TEMPORARY_S:
        return
    if fcntl is None:
        os.unlink(path)  # Windows refuses to delete a file that a live save holds open
        return
    fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    try:
        # Locked: a save is writing it. Unlocked: its writer is gone, unless the file was
        # renamed over the target meanwhile, hence the check that the name is still this file.
        if _try_lock(fd) and os.path.samestat(os.fstat(fd), os.lstat(path)):
            os.unlink(path)
    finally:
        os.close(fd)  # releases the lock


def save_checkpoint(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], config: Mapping[str, Any]
) -> None:
    """Atomically write ``tensors`` and a JSON-serialisable ``config`` to one safetensors file."""
    payload = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {_META_KEY: json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **config})}
    write_atomic(path, save_bytes(payload, metadata=meta))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_checkpoint`; clear errors for missing/foreign/truncated
    files, and for metadata that is not a JSON object of this format (nothing else is checked
    here: see :func:`check_model_record` for the fields)."""
    target = Path(path)
    if not target.is_file():
        raise CheckpointError(f"no checkpoint at {str(target)!r}")
    data = target.read_bytes()
    try:
        tensors = load_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{str(target)!r} is not a readable safetensors file (truncated or corrupted?): {err}"
        ) from err
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    raw = metadata.get(_META_KEY) if isinstance(metadata, dict) else None
    if raw is None:
        raise CheckpointError(
            f"{str(target)!r} is a safetensors file but not an earlyexit checkpoint"
        )
    try:
        config = json.loads(raw) if isinstance(raw, str) else None
    except (json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(
            f"{str(target)!r}: its {_META_KEY!r} metadata is not valid JSON ({err}); the file was "
            "edited or corrupted"
        ) from err
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{str(target)!r}: its {_META_KEY!r} metadata must be a JSON object, got "
            f"{type(config).__name__}; the file was edited or corrupted"
        )
    version = config.get("format_version")
    if config.get("format") != FORMAT or not is_int(version) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(target)!r} has format {config.get('format')!r} v{version!r}; "
            f"this earlyexit reads {FORMAT!r} up to v{FORMAT_VERSION} (upgrade earlyexit?)"
        )
    if version < 1:
        raise field_error("format_version", f"an integer from 1 to {FORMAT_VERSION}", version)
    return tensors, config


def model_state(eem: EarlyExitModel) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and config that describe ``eem`` (heads, thresholds, exits, gate, fingerprint)."""
    tensors = {f"heads.{k}": v for k, v in eem.heads.state_dict().items()}
    tensors["thresholds"] = torch.tensor(eem.thresholds, dtype=torch.float64)
    config = {
        "family": eem.family,
        "exits": [e.name for e in eem.exits],
        "head": eem.head_kind,
        "head_budget": eem.head_budget,
        "gate": eem.gate.config(),
        "supervisor": None if eem.supervisor is None else eem.supervisor.config(),
        "input_size": list(eem.input_size),
        "num_classes": eem.num_classes,
        "base_model": fingerprint(eem.base_model),
    }
    return tensors, config


def save_early_exit_model(
    eem: EarlyExitModel,
    path: str | os.PathLike,
    extra_tensors: Mapping[str, Tensor] | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> None:
    """Write ``eem`` (and optional extra state, e.g. a learner's) to ``path`` atomically."""
    tensors, config = model_state(eem)
    for key, value in (extra_tensors or {}).items():
        tensors[f"extra.{key}"] = value
    if extra_config:
        config["extra"] = dict(extra_config)
    save_checkpoint(path, tensors, config)


def load(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    head: HeadFactory | None = None,
    check_weights: bool = True,
) -> EarlyExitModel:
    """Rebuild a saved :class:`EarlyExitModel` on ``model`` (the same base model it was saved with).

    Args:
        model: the base classifier.
        path: a file written by ``eem.save``.
        head: the head factory, needed only for heads built from a custom callable.
        check_weights: refuse a base model whose weights differ from the saved fingerprint.

    Example:
        >>> eem = ee.load(model, "heads.safetensors")  # doctest: +SKIP
    """
    tensors, config = read_checkpoint(path)
    return restore(model, tensors, config, path=str(path), head=head, check_weights=check_weights)


def check_model_record(config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
    """Check every field of a model checkpoint (:func:`model_state`) before anything is built:
    types, ranges, the tensors' names, dtypes and shapes, thresholds (floating point, one per
    exit, no NaN). Raises a :class:`CheckpointError` naming the first bad field.

    Example:
        >>> check_model_record(*reversed(model_state(eem)))  # doctest: +SKIP
    """
    expect_dict(config, "metadata", _MODEL_KEYS, _MODEL_OPTIONAL)
    expect_str(config["family"], "family")
    exits = expect_list(config["exits"], "exits")
    if (
        not exits
        or not all(isinstance(e, str) and e for e in exits)
        or len(set(exits)) != len(exits)
    ):
        raise field_error("exits", "a non-empty list of distinct module names", exits)
    expect_str(config["head"], "head")
    if "head_budget" in config:
        expect_number(config["head_budget"], "head_budget", low=0.0, high=1.0)
        if config["head_budget"] <= 0:
            raise field_error("head_budget", "a number in (0, 1]", config["head_budget"])
    gate = config["gate"]
    if not isinstance(gate, str):
        expect_str(expect_dict(gate, "gate", ("name",)).get("name"), "gate.name")
    supervisor = config.get("supervisor")
    if supervisor is not None and not isinstance(supervisor, str):
        expect_dict(supervisor, "supervisor", (), ("name", "threshold", "policy"))
        for key in ("name", "policy"):
            if key in supervisor:
                expect_str(supervisor[key], f"supervisor.{key}")
        if "threshold" in supervisor:
            expect_number(supervisor["threshold"], "supervisor.threshold", finite=False)
    size = expect_list(config["input_size"], "input_size", 3)
    for i, side in enumerate(size):
        expect_int(side, f"input_size[{i}]", 1, MAX_INPUT_SIDE)
    if math.prod(size) > MAX_INPUT_ELEMENTS:
        raise field_error("input_size", f"at most {MAX_INPUT_ELEMENTS} elements (C*H*W)", size)
    expect_int(config["num_classes"], "num_classes", 1)
    base = expect_dict(config["base_model"], "base_model", ("architecture", "weights"), ())
    for key in ("architecture", "weights"):
        expect_str(base[key], f"base_model.{key}")
    if "extra" in config:
        expect_dict(config["extra"], "extra")
    for key in tensors:
        if key != "thresholds" and not key.startswith(("heads.", "extra.")):
            raise CheckpointError(
                f"tensor {key!r} is not part of an earlyexit checkpoint (expected 'thresholds', "
                "'heads.*' or 'extra.*')"
            )
    thresholds = expect_tensor(tensors, "thresholds", FLOAT_DTYPES, (len(exits),))
    if bool(torch.isnan(thresholds).any()):
        raise CheckpointError("tensor 'thresholds': holds NaN (a closed exit is inf)")


def model_gate(config: Mapping[str, Any]) -> Gate:
    """The gate a checked model record describes; a :class:`CheckpointError` if it cannot be
    built (unknown name, options the gate does not take or refuses)."""
    try:
        return make_gate(config["gate"])
    except (ConfigError, TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"field 'gate': {show(config['gate'])} is not a gate: {err}") from err


def model_supervisor(config: Mapping[str, Any]) -> Supervisor | None:
    """The final supervisor a checked model record describes (``None``: none)."""
    try:
        return make_supervisor(config.get("supervisor"))
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"field 'supervisor': {show(config.get('supervisor'))} is not a supervisor: {err}"
        ) from err


def _architecture(model: nn.Module, as_dtype: torch.dtype | None = None) -> str:
    """The architecture hash of :func:`fingerprint`; with ``as_dtype``, as if every floating
    tensor of ``model`` had that dtype (to recognise the same model in another precision)."""
    arch = hashlib.blake2b(digest_size=16)
    arch.update(f"{type(model).__module__}.{type(model).__qualname__};".encode())
    for name, tensor in model.state_dict(keep_vars=False).items():
        dtype = as_dtype if as_dtype is not None and tensor.is_floating_point() else tensor.dtype
        arch.update(f"{name}:{tuple(tensor.shape)}:{dtype};".encode())
    return arch.hexdigest()


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    return next((t.dtype for t in model.state_dict().values() if t.is_floating_point()), None)


def check_base_model(
    saved: Mapping[str, str], model: nn.Module, path: str, check_weights: bool = True
) -> bool:
    """Refuse a base model other than the one a checkpoint was saved for (``saved`` is its
    fingerprint). The same model in another floating-point dtype is named as such, with how to
    load; with ``check_weights=False`` it is accepted and True is returned (the heads are then
    cast to the model's dtype, their weights unchecked).

    Example:
        >>> check_base_model(fingerprint(model), model, "h.safetensors")  # doctest: +SKIP
        False
    """
    current = fingerprint(model)
    if saved["architecture"] == current["architecture"]:
        if check_weights and saved["weights"] != current["weights"]:
            raise CheckpointError(
                f"{path} was saved for a model of the same architecture but different weights: "
                "its heads would be wrong here. Load onto the original weights (or pass "
                "check_weights=False if you know the features are unchanged)."
            )
        return False
    have = _float_dtype(model)
    for dtype in FLOAT_DTYPES:
        if dtype == have or _architecture(model, dtype) != saved["architecture"]:
            continue
        if not check_weights:
            return True
        name, now = str(dtype).removeprefix("torch."), str(have).removeprefix("torch.")
        raise CheckpointError(
            f"{path} was saved for this model in {name}, but this model is in {now} (its weights "
            f"cannot be checked against the {name} ones). Load it onto the model in {name}, as it "
            f"was saved, then convert the wrapper: eem = ee.load(model, path); "
            f"eem.to(torch.{now}) (heads and base model together). Or pass check_weights=False "
            f"to load the heads converted to {now} without checking the weights."
        )
    raise CheckpointError(
        f"{path} was saved for a different base model architecture; load it onto the model it "
        "was trained with"
    )


def check_heads_state(heads: nn.Module, state: Mapping[str, Tensor], cast: bool = False) -> None:
    """Check saved head tensors (``heads.`` prefix removed) against ``heads`` before loading:
    the same names and shapes, the same dtypes (any floating dtype for floating tensors when
    ``cast``: the model was loaded in another precision). Nothing is changed.

    Example:
        >>> check_heads_state(eem.heads, eem.heads.state_dict())  # doctest: +SKIP
    """
    current = heads.state_dict()
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    if missing or unexpected:
        raise CheckpointError(
            f"the saved heads do not fit this model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}): were they saved with other exits or another head kind?"
        )
    for key, want in current.items():
        dtypes = FLOAT_DTYPES if cast and want.is_floating_point() else (want.dtype,)
        expect_tensor(state, key, dtypes, tuple(want.shape))


def _in_file(path: str, err: CheckpointError) -> CheckpointError:
    return CheckpointError(f"{path}: {err}")


def restore(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    config: Mapping[str, Any],
    *,
    path: str = "<checkpoint>",
    head: HeadFactory | None = None,
    check_weights: bool = True,
) -> EarlyExitModel:
    """Build the :class:`EarlyExitModel` described by ``(tensors, config)`` on ``model``.

    Every field is checked before anything is built; a refused file leaves ``model`` as it was
    (no hook stays attached)."""
    from .wrapping import wrap

    try:
        check_model_record(config, tensors)
        gate, supervisor = model_gate(config), model_supervisor(config)
    except CheckpointError as err:
        raise _in_file(path, err) from err
    cast = check_base_model(config["base_model"], model, path, check_weights)
    kind = config["head"]
    if kind == "custom" and head is None:
        raise CheckpointError(
            f"{path} holds custom heads: pass the same factory with load(..., head=factory)"
        )
    try:
        eem = wrap(
            model,
            exits=list(config["exits"]),
            head=head if head is not None else kind,
            gate=gate,
            supervisor=supervisor,
            input_size=tuple(config["input_size"]),
            head_budget=float(config.get("head_budget", 0.01)),
            validate=False,
        )
    except (ConfigError, UnsupportedModelError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path} does not fit this model: {err}") from err
    try:
        if eem.num_classes != config["num_classes"]:
            raise field_error(
                "num_classes", f"{eem.num_classes} (this model's)", config["num_classes"]
            )
        state = {k[len("heads.") :]: v for k, v in tensors.items() if k.startswith("heads.")}
        check_heads_state(eem.heads, state, cast)
        eem.heads.load_state_dict(state, strict=True)
        eem.set_thresholds(tensors["thresholds"].tolist())
    except CheckpointError as err:
        eem.remove()
        raise _in_file(path, err) from err
    except BaseException:
        eem.remove()
        raise
    return eem
