"""What an exit's head and gate cost in wall-clock, as a share of the base model's time.

MACs price a head at ~1% of a small backbone, but at batch 1 on a CPU a head is a dozen small
operators whose dispatch costs far more than their arithmetic (on a 6 ms EfficientNet-Lite0 at
64x64, ~0.2-0.3 ms each). :func:`measure_head_time_fractions` measures that once, so exit
selection can price heads in time (``DistillConfig(head_cost="time")``); the numbers it returns
are stored and can be given back (``head_time_fractions``) to make a run reproducible.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .gates import Gate, GateContext

if TYPE_CHECKING:  # the wrapper imports nothing from here; this only types the argument
    from .model import EarlyExitModel


def exit_features(model: nn.Module, names: Sequence[str], x: Tensor) -> list[Tensor]:
    """The outputs of the modules ``names`` of ``model`` on ``x`` (one plain forward pass;
    temporary hooks, removed before returning; the model's parameters are not touched).

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
        >>> [tuple(f.shape) for f in exit_features(m, ["0"], torch.zeros(2, 4))]
        [(2, 3)]
    """
    captured: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            if isinstance(output, Tensor):
                captured[name] = output

        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in captured]
    if missing:
        raise ConfigError(f"no tensor output captured at {missing}: not stage boundaries")
    return [captured[n] for n in names]


def measure_head_time_fractions(
    eem: EarlyExitModel,
    gate: Gate | None = None,
    *,
    batch_size: int = 1,
    reps: int = 15,
    warmup: int = 2,
    seed: int = 0,
) -> tuple[float, ...]:
    """Per exit, the median time of its head (``reduce`` + ``classify``) and ``gate`` score
    (with every earlier head as history) at ``batch_size``, as a fraction of the median time of
    the base model's own forward pass at that batch size.

    The base model and the heads are timed in one interleaved loop (``reps`` rounds after
    ``warmup``), on a seeded random input at the model's input size, so a busy machine slows
    both alike. The result is a measurement, not a constant: store it (``DistillConfig``'s
    ``head_time_fractions``) to reuse it.

    Example:
        >>> fractions = measure_head_time_fractions(eem, reps=5)  # doctest: +SKIP
        >>> len(fractions) == eem.num_exits  # doctest: +SKIP
        True
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ConfigError(f"reps must be an int >= 1, got {reps!r}")
    gate = eem.gate if gate is None else gate
    model = eem.base_model
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *eem.input_size), generator=generator).to(device, dtype)
    features = exit_features(model, [p.name for p in eem.exits], x)
    heads = tuple(eem.heads)
    rows = torch.arange(batch_size, device=device)

    def run_exit(i: int, history: list[Tensor]) -> Tensor:
        logits = heads[i].classify(heads[i].reduce(features[i]))
        gate.checked_score(logits, GateContext(i, rows, history[:i]))
        return logits

    with torch.no_grad():
        history = []
        for i in range(len(heads)):
            history.append(run_exit(i, history))
        base_times: list[float] = []
        head_times: list[list[float]] = [[] for _ in heads]
        for r in range(warmup + reps):
            start = time.perf_counter()
            model(x)
            base = time.perf_counter() - start
            spent = []
            for i in range(len(heads)):
                start = time.perf_counter()
                run_exit(i, history)
                spent.append(time.perf_counter() - start)
            if r >= warmup:
                base_times.append(base)
                for i, t in enumerate(spent):
                    head_times[i].append(t)
    base_median = statistics.median(base_times)
    return tuple(statistics.median(t) / base_median for t in head_times)


__all__ = ["exit_features", "measure_head_time_fractions"]
