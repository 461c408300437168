"""Loading saved exit heads: check every field of a checkpoint, then rebuild the wrapper.

``ee.load(model, path)`` reads a file written by ``eem.save`` (:mod:`earlyexit.io`), checks every
field before anything is built (types, ranges, shapes, dtypes; the base model's fingerprint and
dtype), wraps ``model`` with the saved exits, head kind(s) and gate, and installs the saved heads
and thresholds. A refused file raises :class:`~earlyexit.CheckpointError` naming the field and leaves
``model`` as it was (no hook left on it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
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
    show,
)
from .errors import CheckpointError, ConfigError, UnsupportedModelError
from .gates import Gate, make_gate
from .io import architecture_hash, fingerprint, read_checkpoint
from .supervisors import Supervisor, make_supervisor
from .wrapping import _wrap

if TYPE_CHECKING:
    from .heads import HeadFactory
    from .model import EarlyExitModel

#: Bounds on a saved ``input_size``: loading probes the model once at that size, so a file must
#: not be able to ask for an input of gigabytes.
MAX_INPUT_SIDE = 16384
MAX_INPUT_ELEMENTS = 2**26
#: Keys of the model record (:func:`model_state`); ``head_budget`` and ``supervisor`` may be
#: absent, ``extra`` holds the state of whatever saved the model alongside (e.g. a learner).
_MODEL_KEYS = ("family", "exits", "head", "gate", "input_size", "num_classes", "base_model")
_MODEL_OPTIONAL = ("format", "format_version", "head_budget", "supervisor", "extra")


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
        head: the head factory, needed only for heads built from a custom callable (for a file
            whose exits have different kinds, it builds the exits saved as ``"custom"``).
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
    head = config["head"]
    if isinstance(head, list):  # one kind per exit (saved when they differ)
        expect_list(head, "head", len(exits))
        for i, kind in enumerate(head):
            expect_str(kind, f"head[{i}]")
    elif not isinstance(head, str):
        raise field_error("head", f"a head name or a list of {len(exits)} (one per exit)", head)
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
        if dtype == have or architecture_hash(model, dtype) != saved["architecture"]:
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

    try:
        check_model_record(config, tensors)
        gate, supervisor = model_gate(config), model_supervisor(config)
    except CheckpointError as err:
        raise _in_file(path, err) from err
    cast = check_base_model(config["base_model"], model, path, check_weights)
    kind = config["head"]
    if (kind == "custom" or (isinstance(kind, list) and "custom" in kind)) and head is None:
        raise CheckpointError(
            f"{path} holds custom heads: pass the same factory with load(..., head=factory)"
        )
    if isinstance(kind, list):  # one kind per exit, in exit order; the factory builds "custom"
        heads: Any = [head if k == "custom" else k for k in kind]
    else:
        heads = head if head is not None else kind
    try:
        eem = _wrap(
            model,
            exits=list(config["exits"]),
            head=heads,
            gate=gate,
            supervisor=supervisor,
            input_size=tuple(config["input_size"]),
            head_budget=float(config.get("head_budget", 0.01)),
            validate=False,
            factories_in_list=True,
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
