"""Exceptions raised by earlyexit. Each message says what was expected and what to do."""

from __future__ import annotations


class EarlyExitError(Exception):
    """Base class of every error earlyexit raises on purpose."""


class InputError(EarlyExitError, ValueError):
    """A batch the wrapped model cannot serve (shape, dtype, device, NaN/Inf, ...)."""


class ConfigError(EarlyExitError, ValueError):
    """Bad arguments to wrap/set_thresholds/configs: unknown names, exits out of range, ..."""


class UnsupportedModelError(EarlyExitError, TypeError):
    """The model cannot be run stage by stage with the registered adapters."""


class CheckpointError(EarlyExitError, ValueError):
    """A checkpoint that is truncated, foreign, or made for another base model."""


class BackgroundTrainingError(EarlyExitError, RuntimeError):
    """The background trainer of an :class:`~earlyexit.distill.OnlineDistiller` failed; raised by
    its next ``step``, ``sync`` or ``calibrate``."""
