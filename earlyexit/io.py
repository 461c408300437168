"""Checkpoint files: one safetensors file, JSON config in its metadata, written atomically.

Only the heads, thresholds and config are stored, with a fingerprint of the base model (its
architecture, and a hash of its weights), so loading onto another model is a clear error instead of
silently wrong heads (:mod:`earlyexit.loading` checks every field and rebuilds the wrapper).
Writes are atomic: the file is written beside the target and renamed over it, so an interrupted
save leaves the previous file intact; temporaries a killed save left behind are removed by the
next save of the same target.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor, nn

from ._checks import (
    field_error,
    is_int,
)
from .errors import CheckpointError, ConfigError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (but an open file cannot be deleted there)
    fcntl = None  # type: ignore[assignment]

FORMAT = "earlyexit"
FORMAT_VERSION = 1
_META_KEY = "earlyexit"


def architecture_hash(model: nn.Module, as_dtype: torch.dtype | None = None) -> str:
    """Hash of a model's class and of every state tensor's name, shape and dtype; with
    ``as_dtype``, as if every floating tensor had that dtype (to recognise the same model in
    another precision).

    Example:
        >>> a = torch.nn.Linear(2, 2)
        >>> architecture_hash(a.half(), as_dtype=torch.float32) == architecture_hash(a.float())
        True
    """
    arch = hashlib.blake2b(digest_size=16)
    arch.update(f"{type(model).__module__}.{type(model).__qualname__};".encode())
    for name, tensor in model.state_dict(keep_vars=False).items():
        dtype = as_dtype if as_dtype is not None and tensor.is_floating_point() else tensor.dtype
        arch.update(f"{name}:{tuple(tensor.shape)}:{dtype};".encode())
    return arch.hexdigest()


def fingerprint(model: nn.Module) -> dict[str, str]:
    """Hashes of a model's architecture (:func:`architecture_hash`) and of its weights' bytes.

    Example:
        >>> fp = fingerprint(torch.nn.Linear(2, 2))
        >>> sorted(fp)
        ['architecture', 'weights']
    """
    weights = hashlib.blake2b(digest_size=16)
    for tensor in model.state_dict(keep_vars=False).values():
        data = tensor.detach().reshape(-1).contiguous().cpu()
        weights.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return {"architecture": architecture_hash(model), "weights": weights.hexdigest()}


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


def model_state(eem: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and config that describe an :class:`~earlyexit.model.EarlyExitModel` (heads,
    thresholds, exits, gate, fingerprint). Read through its attributes only: this module sits
    below the model, which calls it to save itself."""
    tensors = {f"heads.{k}": v for k, v in eem.heads.state_dict().items()}
    tensors["thresholds"] = torch.tensor(eem.thresholds, dtype=torch.float64)
    config = {
        "family": eem.family,
        "exits": [e.name for e in eem.exits],
        # One name when every exit shares it (the layout files had before per-exit kinds, which
        # older readers expect), else one name per exit.
        "head": eem.head_kinds[0] if len(set(eem.head_kinds)) == 1 else list(eem.head_kinds),
        "head_budget": eem.head_budget,
        "gate": eem.gate.config(),
        "supervisor": None if eem.supervisor is None else eem.supervisor.config(),
        "input_size": list(eem.input_size),
        "num_classes": eem.num_classes,
        "base_model": fingerprint(eem.base_model),
    }
    return tensors, config


def save_early_exit_model(
    eem: Any,
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
