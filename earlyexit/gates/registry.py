"""Gates by name: ``wrap(gate="margin")``, saved configs, and user gates added with
:func:`register_gate`.

The registry follows the library's one convention (:mod:`earlyexit._registry`): a taken name is an
error unless ``overwrite=True``, an unknown name is an error that lists the known ones, and every
operation is thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable

from .._registry import Registry
from ..errors import ConfigError
from .base import (
    AgreementGate,
    EntropyGate,
    Gate,
    GiniGate,
    MarginGate,
    MaxSoftmaxGate,
    PatienceGate,
)
from .learned import LearnedGate

_GATES: Registry[Callable[..., Gate]] = Registry("gate")


def register_gate(name: str, factory: Callable[..., Gate], *, overwrite: bool = False) -> None:
    """Make ``gate=name`` available in :func:`earlyexit.wrap` (and in saved configs).

    ``factory(**options)`` returns a :class:`~earlyexit.gates.Gate`; a saved config
    ``{"name": name, **options}`` is rebuilt with it.

    Raises:
        ConfigError: ``name`` is already registered and ``overwrite`` is False.

    Example:
        >>> register_gate("max_softmax_alias", MaxSoftmaxGate)
        >>> make_gate("max_softmax_alias")
        MaxSoftmaxGate()
        >>> unregister_gate("max_softmax_alias")
    """
    _GATES.register(name, factory, overwrite=overwrite)


def unregister_gate(name: str) -> None:
    """Remove the gate registered as ``name`` (no error if there is none).

    Example:
        >>> unregister_gate("not_registered")
    """
    _GATES.unregister(name)


def gate_names() -> tuple[str, ...]:
    """Names accepted by ``wrap(gate=...)``, sorted.

    Example:
        >>> "margin" in gate_names()
        True
    """
    return tuple(sorted(_GATES.names()))


def make_gate(gate: str | Gate | dict) -> Gate:
    """A :class:`~earlyexit.gates.Gate` from a name, a saved config dict, or a gate object
    (returned as is).

    Example:
        >>> make_gate("margin")
        MarginGate()
    """
    if isinstance(gate, Gate):
        return gate
    if isinstance(gate, dict):
        options = dict(gate)
        name = options.pop("name", None)
        return _GATES.get(name)(**options)
    if isinstance(gate, str):
        return _GATES.get(gate, alternative=" or pass a Gate object")()
    raise ConfigError(f"gate must be a name or a Gate, got {type(gate).__name__}")


for _cls in (
    MaxSoftmaxGate,
    MarginGate,
    EntropyGate,
    GiniGate,
    AgreementGate,
    PatienceGate,
    LearnedGate,
):
    register_gate(_cls.name, _cls)
del _cls

__all__ = ["gate_names", "make_gate", "register_gate", "unregister_gate"]
