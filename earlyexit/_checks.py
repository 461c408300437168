"""Checks of fields read from a checkpoint file: types, ranges, tensor dtypes and shapes.

A file can say anything, so every field is checked before it is used or anything is allocated for
it. Each check returns the value when it fits and otherwise raises a
:class:`~earlyexit.CheckpointError` that names the field and says what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError

#: Largest count or size a checkpoint field may hold (what an int64 tensor holds).
MAX_INT = 2**63 - 1
#: The floating-point dtypes a checkpoint's float tensors may have. An allow-list: a dtype named
#: in a file is compared with these, never looked up on ``torch``.
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def show(value: Any) -> str:
    """``repr(value)``, cut to fit an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (JSON true is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def field_error(field: str, expected: str, got: Any) -> CheckpointError:
    """The error for checkpoint field ``field``: what was expected and what the file holds.

    Example:
        >>> str(field_error("counters.samples", "an integer >= 0", "x"))
        "field 'counters.samples': expected an integer >= 0, got 'x'"
    """
    return CheckpointError(f"field {field!r}: expected {expected}, got {show(got)}")


def expect_int(value: Any, field: str, low: int = 0, high: int = MAX_INT) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``, else a :class:`CheckpointError`.

    Example:
        >>> expect_int(3, "samples")
        3
    """
    if not is_int(value) or not low <= value <= high:
        expected = f"an integer in [{low}, {high}]" if high < MAX_INT else f"an integer >= {low}"
        raise field_error(field, expected, value)
    return value


def expect_number(
    value: Any,
    field: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    finite: bool = True,
    nan: bool = False,
) -> float:
    """``value`` as a float if it is a number (not a bool) in ``[low, high]``; ``finite`` refuses
    infinities, ``nan`` allows NaN.

    Example:
        >>> expect_number(2, "credit", low=0.0)
        2.0
    """
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and is_int(value) and abs(value) > MAX_INT:
        ok = False  # a huge JSON integer: no float holds it exactly
    if ok and math.isnan(value):
        ok = nan
    elif ok:
        ok = (math.isfinite(value) or not finite) and low <= value <= high
    if not ok:
        where = "finite " if finite else ""
        raise field_error(field, f"a {where}number in [{low}, {high}]", value)
    return float(value)


def expect_str(value: Any, field: str, choices: tuple[str, ...] | None = None) -> str:
    """``value`` if it is a string (one of ``choices`` when given)."""
    if not isinstance(value, str) or (choices is not None and value not in choices):
        raise field_error(field, f"one of {choices}" if choices else "a string", value)
    return value


def expect_bool(value: Any, field: str) -> bool:
    """``value`` if it is True or False."""
    if not isinstance(value, bool):
        raise field_error(field, "true or false", value)
    return value


def expect_list(value: Any, field: str, length: int | None = None) -> list:
    """``value`` if it is a JSON list (of ``length`` items when given)."""
    if not isinstance(value, list) or (length is not None and len(value) != length):
        size = f" of {length} items" if length is not None else ""
        raise field_error(field, f"a list{size}", value)
    return value


def expect_dict(
    value: Any,
    field: str,
    required: tuple[str, ...] = (),
    optional: tuple[str, ...] | None = None,
) -> dict:
    """``value`` if it is a JSON object holding every ``required`` key; with ``optional`` given,
    only keys from ``required + optional`` (a known layout: another key is a foreign file).

    Example:
        >>> expect_dict({"a": 1}, "record", required=("a",), optional=())
        {'a': 1}
    """
    if not isinstance(value, dict):
        raise field_error(field, "a JSON object", value)
    missing = [key for key in required if key not in value]
    if missing:
        raise CheckpointError(f"field {field!r}: missing {', '.join(map(repr, missing))}")
    if optional is not None:
        unknown = sorted(str(k) for k in value if k not in required and k not in optional)
        if unknown:
            raise CheckpointError(
                f"field {field!r}: unknown keys {unknown}; expected only "
                f"{sorted((*required, *optional))}"
            )
    return value


def expect_tensor(
    tensors: Mapping[str, Tensor],
    key: str,
    dtypes: tuple[torch.dtype, ...],
    shape: tuple[int | None, ...] | None = None,
) -> Tensor:
    """Tensor ``key`` if present, of one of ``dtypes`` and of ``shape`` (``None`` entries: any
    size), else a :class:`CheckpointError` naming it.

    Example:
        >>> expect_tensor({"t": torch.zeros(2)}, "t", FLOAT_DTYPES, (2,)).shape
        torch.Size([2])
    """
    if key not in tensors:
        raise CheckpointError(f"tensor {key!r} is missing")
    tensor = tensors[key]
    names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
    if tensor.dtype not in dtypes:
        raise CheckpointError(
            f"tensor {key!r}: expected dtype {names}, "
            f"got {str(tensor.dtype).removeprefix('torch.')}"
        )
    if shape is not None and (
        tensor.dim() != len(shape)
        or any(
            want is not None and got != want for got, want in zip(tensor.shape, shape, strict=True)
        )
    ):
        want = tuple("*" if n is None else n for n in shape)
        raise CheckpointError(f"tensor {key!r}: expected shape {want}, got {tuple(tensor.shape)}")
    return tensor
