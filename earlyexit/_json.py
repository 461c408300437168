"""Strict-JSON numbers for reports: infinite thresholds (closed gates) are legal values here, but
JSON has no infinity, so they travel as the strings ``"inf"`` / ``"-inf"``."""

from __future__ import annotations

import math
from typing import Any


def json_float(value: float | None) -> float | str | None:
    """``inf`` as ``"inf"`` (``-inf`` likewise), ``None`` kept; NaN is a bug upstream and raises.

    Example:
        >>> json_float(float("inf")), json_float(0.5), json_float(None)
        ('inf', 0.5, None)
    """
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        raise ValueError("NaN where a report needs a number")
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def json_safe(value: Any) -> Any:
    """Recursively make nested dicts/lists strict JSON: infinities as strings, NaN (a statistic
    with no samples behind it) as ``None``.

    Example:
        >>> json_safe({"t": [float("inf"), 1.0], "agreement": float("nan")})
        {'t': ['inf', 1.0], 'agreement': None}
    """
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return json_float(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def from_json_float(value: float | str | None) -> float | None:
    """The inverse of :func:`json_float`: ``"inf"`` / ``"-inf"`` back to floats, numbers as floats.

    Example:
        >>> from_json_float("inf"), from_json_float(0.5), from_json_float(None)
        (inf, 0.5, None)
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value not in ("inf", "-inf"):
            raise ValueError(f"expected a number, 'inf' or '-inf', got {value!r}")
        return math.inf if value == "inf" else -math.inf
    return float(value)
