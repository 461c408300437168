"""Gates (supervisor 1 at each exit): a score per sample from a head's logits.

A sample leaves at exit ``i`` when ``gate.score(...) >= thresholds[i]``. Higher scores mean more
confident. Calibration only ever sees scores, so every gate is calibrated the same way.

The maths lives in plain functions (``max_softmax_score`` ...), the classes only bind them to the
:class:`Gate` interface; :func:`make_gate` turns a name into a gate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from .errors import ConfigError


@dataclass
class GateContext:
    """What a gate may look at besides the current logits.

    Attributes:
        exit_index: which exit is deciding (``num_exits`` for the final classifier).
        rows: ``[R]`` int64, the input rows (positions in the caller's batch) of the running samples.
        history: logits of the heads evaluated earlier for these same rows, in exit order; ``None``
            where an exit's head was not evaluated. Filled only for gates with ``needs_history``.
    """

    exit_index: int
    rows: Tensor
    history: list[Tensor | None] = field(default_factory=list)


def max_softmax_score(logits: Tensor) -> Tensor:
    """Largest softmax probability, in [1/K, 1]."""
    return logits.float().softmax(dim=-1).amax(dim=-1)


def margin_score(logits: Tensor) -> Tensor:
    """Top-1 minus top-2 softmax probability (the prediction-confidence score), in [0, 1]."""
    probs = logits.float().softmax(dim=-1)
    if probs.shape[-1] < 2:
        return probs[..., 0]
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def neg_entropy_score(logits: Tensor) -> Tensor:
    """Negative entropy of the softmax, in [-log K, 0]: 0 for a one-hot prediction."""
    log_probs = logits.float().log_softmax(dim=-1)
    return (log_probs.exp() * log_probs).sum(dim=-1)


def gini_score(logits: Tensor) -> Tensor:
    """Sum of squared softmax probabilities (1 minus DeepGini's impurity), in [1/K, 1]."""
    probs = logits.float().softmax(dim=-1)
    return (probs * probs).sum(dim=-1)


class Gate:
    """Base class: subclasses implement :meth:`score`.

    ``needs_history = True`` asks the wrapper to evaluate (and remember) every earlier head, even
    where that exit's own gate is closed.

    Example:
        >>> class AlwaysSure(Gate):
        ...     name = "always_sure"
        ...     def score(self, logits, ctx):
        ...         return torch.ones(logits.shape[0])
    """

    name: ClassVar[str] = "custom"
    needs_history: ClassVar[bool] = False

    def score(self, logits: Tensor, ctx: GateContext) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-serialisable description (saved with the heads)."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _ScoreGate(Gate):
    """A gate that is a plain function of the current logits."""

    fn: ClassVar[Callable[[Tensor], Tensor]]

    def score(self, logits: Tensor, ctx: GateContext) -> Tensor:
        return type(self).fn(logits)


class MaxSoftmaxGate(_ScoreGate):
    """Exit when the largest softmax probability reaches the threshold (the classic rule)."""

    name = "max_softmax"
    fn = staticmethod(max_softmax_score)


class MarginGate(_ScoreGate):
    """Exit when top-1 minus top-2 probability reaches the threshold."""

    name = "margin"
    fn = staticmethod(margin_score)


class EntropyGate(_ScoreGate):
    """Exit when the negative entropy reaches the threshold (low entropy = confident)."""

    name = "entropy"
    fn = staticmethod(neg_entropy_score)


class GiniGate(_ScoreGate):
    """Exit when the sum of squared probabilities reaches the threshold (DeepGini)."""

    name = "gini"
    fn = staticmethod(gini_score)


_GATES: dict[str, Callable[..., Gate]] = {}


def register_gate(name: str, factory: Callable[..., Gate]) -> None:
    """Make ``gate=name`` available in :func:`earlyexit.wrap`.

    Example:
        >>> register_gate("max_softmax_alias", MaxSoftmaxGate)
    """
    _GATES[name] = factory


def gate_names() -> tuple[str, ...]:
    """Names accepted by ``wrap(gate=...)``."""
    return tuple(sorted(_GATES))


def make_gate(gate: str | Gate | dict) -> Gate:
    """A :class:`Gate` from a name, a saved config dict, or a gate object (returned as is).

    Example:
        >>> make_gate("margin")
        MarginGate()
    """
    if isinstance(gate, Gate):
        return gate
    if isinstance(gate, dict):
        options = dict(gate)
        name = options.pop("name", None)
        if name not in _GATES:
            raise ConfigError(f"unknown gate {name!r}; choose one of {', '.join(gate_names())}")
        return _GATES[name](**options)
    if isinstance(gate, str):
        if gate not in _GATES:
            raise ConfigError(
                f"unknown gate {gate!r}; choose one of {', '.join(gate_names())} or pass a Gate object"
            )
        return _GATES[gate]()
    raise ConfigError(f"gate must be a name or a Gate, got {type(gate).__name__}")


for _cls in (MaxSoftmaxGate, MarginGate, EntropyGate, GiniGate):
    register_gate(_cls.name, _cls)

__all__ = [
    "EntropyGate",
    "Gate",
    "GateContext",
    "GiniGate",
    "MarginGate",
    "MaxSoftmaxGate",
    "gate_names",
    "gini_score",
    "make_gate",
    "margin_score",
    "max_softmax_score",
    "neg_entropy_score",
    "register_gate",
]
