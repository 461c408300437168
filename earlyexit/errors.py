"""Exceptions raised by earlyexit. Each message says what was expected and what to do.

Every error earlyexit raises on purpose derives from :class:`EarlyExitError`, and also from the
built-in exception a caller would expect (``ValueError`` for bad arguments, ``TypeError`` for an
unsupported model, ...), so ``except ValueError`` keeps working around calls into the library.
"""

from __future__ import annotations

from typing import Any


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


class ShippedFileError(EarlyExitError, OSError):
    """A data or weights file the package ships is missing or corrupt (reinstall restores it)."""


class MissingPackageError(EarlyExitError, ImportError):
    """A feature needs a package of an optional extra (``earlyexit[demo]``, ``earlyexit[serve]``)
    that is not installed.

    An ``ImportError``, so ``except ImportError`` keeps catching it; the message names the feature,
    the package and the install command.
    """


class MissingDemoPackageError(MissingPackageError):
    """A feature needs a package of the ``earlyexit[demo]`` extra that is not installed.

    An ``ImportError``, so ``except ImportError`` keeps catching it; the message names the feature,
    the package and the install command.
    """


class UntrustedPredictionError(EarlyExitError, RuntimeError):
    """The final supervisor rejected at least one prediction (policy ``"raise"``).

    Attributes:
        result: the whole batch's :class:`~earlyexit.model.ExitResult` (``accepted`` says which rows).
        rows: ``[R]`` int64, the rejected rows.
    """

    def __init__(self, result: Any) -> None:
        self.result = result
        self.rows = (~result.accepted).nonzero().flatten()
        super().__init__(
            f"the final supervisor does not trust {self.rows.numel()} of {len(result)} predictions "
            f"(rows {self.rows.tolist()[:10]}{'...' if self.rows.numel() > 10 else ''}); the "
            "answers are in .result, the rejected rows in .rows"
        )


class FallbackError(EarlyExitError, RuntimeError):
    """The user's fallback returned something that cannot replace the rejected logits."""


class RemoteTierError(EarlyExitError, RuntimeError):
    """A remote cascade tier could not answer (unreachable, timed out, HTTP error, bad reply)."""


class BackgroundTrainingError(EarlyExitError, RuntimeError):
    """The background trainer of an :class:`~earlyexit.distill.OnlineDistiller` failed; raised by
    its next ``step``, ``sync`` or ``calibrate``."""
