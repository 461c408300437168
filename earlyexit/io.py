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
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor, nn

from .errors import CheckpointError

if TYPE_CHECKING:
    from .heads import HeadFactory
    from .model import EarlyExitModel

FORMAT = "earlyexit"
FORMAT_VERSION = 1
_META_KEY = "earlyexit"


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


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_checkpoint(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], config: Mapping[str, Any]
) -> None:
    """Atomically write ``tensors`` and a JSON-serialisable ``config`` to one safetensors file."""
    payload = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {_META_KEY: json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **config})}
    write_atomic(path, save_bytes(payload, metadata=meta))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_checkpoint`; clear errors for missing/foreign/truncated files."""
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
    raw = (header.get("__metadata__") or {}).get(_META_KEY)
    if raw is None:
        raise CheckpointError(
            f"{str(target)!r} is a safetensors file but not an earlyexit checkpoint"
        )
    config = json.loads(raw)
    if config.get("format") != FORMAT or config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(target)!r} has format {config.get('format')!r} v{config.get('format_version')}; "
            f"this earlyexit reads {FORMAT!r} up to v{FORMAT_VERSION} (upgrade earlyexit?)"
        )
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


def restore(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    config: Mapping[str, Any],
    *,
    path: str = "<checkpoint>",
    head: HeadFactory | None = None,
    check_weights: bool = True,
) -> EarlyExitModel:
    """Build the :class:`EarlyExitModel` described by ``(tensors, config)`` on ``model``."""
    from .wrapping import wrap

    saved = config.get("base_model", {})
    current = fingerprint(model)
    if saved.get("architecture") != current["architecture"]:
        raise CheckpointError(
            f"{path} was saved for a different base model architecture ({config.get('family')}); "
            "load it onto the model it was trained with"
        )
    if check_weights and saved.get("weights") != current["weights"]:
        raise CheckpointError(
            f"{path} was saved for a model of the same architecture but different weights: its heads "
            "would be wrong here. Load onto the original weights (or pass check_weights=False if you "
            "know the features are unchanged)."
        )
    kind = config.get("head")
    if kind == "custom" and head is None:
        raise CheckpointError(
            f"{path} holds custom heads: pass the same factory with load(..., head=factory)"
        )
    try:
        eem = wrap(
            model,
            exits=list(config["exits"]),
            head=head if head is not None else kind,
            gate=config["gate"],
            supervisor=config.get("supervisor"),
            input_size=tuple(config["input_size"]),
            head_budget=float(config.get("head_budget", 0.01)),
            validate=False,
        )
        state = {k[len("heads.") :]: v for k, v in tensors.items() if k.startswith("heads.")}
        eem.heads.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path} does not fit this model: {err}") from err
    eem.set_thresholds(tensors["thresholds"].tolist())
    return eem
