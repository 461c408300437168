"""Wall-clock cost of early exit: wrapped vs unwrapped, timed side by side in the same run.

Timings on a shared machine drift (other processes, thermal state, allocator), so absolute
seconds mean little and every figure here is a *ratio* against the base model measured in the
same loop: repetitions are interleaved (base, config 1, config 2, ..., in a rotating order) so
drift hits every configuration alike. Warm-up calls are excluded, the number of CPU threads is
fixed for the measurement, and on CUDA each call is timed with CUDA events after a synchronise.

Exit mixes (which share of a batch leaves at which exit) are forced with
:class:`ScriptedExitGate`, so the cost of batch shrinking (several smaller kernels instead of one
big one) can be compared with what the MAC fraction of the mix predicts.

Example:
    >>> stats = compare_latency({"base": model, "eem": eem}, x, reps=20)  # doctest: +SKIP
    >>> stats["eem"].median_s / stats["base"].median_s  # doctest: +SKIP
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._threads import fixed_threads
from ..gates.scripted import ScriptedExitGate

__all__ = [
    "ExitMix",
    "MixTiming",
    "ScriptedExitGate",
    "TimingStats",
    "bench_exit_mixes",
    "compare_latency",
    "default_mixes",
    "fixed_threads",
    "stream_latency",
]


@dataclass(frozen=True)
class TimingStats:
    """Per-call wall-clock times of one configuration (seconds).

    Attributes:
        median_s, p90_s, mean_s, min_s: statistics over the timed repetitions.
        reps: number of timed repetitions (warm-up excluded).
        batch: batch size of each call.
        times: every timed repetition, in order (repetition ``r`` of every config of one
            :func:`compare_latency` call ran back to back, so ``a.times[r] / b.times[r]`` pairs).
    """

    median_s: float
    p90_s: float
    mean_s: float
    min_s: float
    reps: int
    batch: int
    times: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def paired_ratio(self, base: TimingStats) -> float:
        """Median over repetitions of ``self.times[r] / base.times[r]``.

        Each pair ran within the same repetition, so slow drift (load from other processes)
        cancels in the pair; the most robust ratio on a shared machine.
        """
        if len(self.times) != len(base.times) or not self.times:
            raise ValueError("paired ratios need the same number of recorded repetitions")
        return statistics.median(a / b for a, b in zip(self.times, base.times, strict=True))

    @property
    def throughput(self) -> float:
        """Samples per second at the median call time."""
        return self.batch / self.median_s

    @classmethod
    def from_times(cls, times: Sequence[float], batch: int) -> TimingStats:
        ordered = sorted(times)
        p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
        return cls(
            median_s=statistics.median(ordered),
            p90_s=p90,
            mean_s=statistics.fmean(ordered),
            min_s=ordered[0],
            reps=len(ordered),
            batch=batch,
            times=tuple(times),
        )


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    if device.type == "cuda":

        def time_cuda(fn: Callable[[], Any]) -> float:
            # Events on the current stream measure GPU time of the call; synchronise before so
            # no earlier work is attributed to it, and after so the elapsed time is readable.
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1000.0

        return time_cuda

    def time_cpu(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return time_cpu


def compare_latency(
    configs: Mapping[str, Callable[[Tensor], Any]],
    inputs: Tensor | Sequence[Tensor],
    *,
    reps: int = 20,
    warmup: int = 2,
    threads: int | None = None,
    progress: bool = False,
    before_call: Mapping[str, Callable[[], None]] | None = None,
) -> dict[str, TimingStats]:
    """Time several callables on the same inputs, interleaving their repetitions.

    Args:
        configs: name -> callable (e.g. ``{"base": model, "eem": eem}``).
        inputs: one batch, or a list of batches used in turn (repetition ``r`` gives every config
            ``inputs[r % len(inputs)]``, so configs see the same samples).
        reps: timed repetitions per config (after ``warmup`` untimed ones per config).
        threads: CPU threads during the measurement (``None``: leave as is).
        progress: tqdm bar on stderr.
        before_call: optional name -> untimed setup run before each call of that config (e.g. to
            set a scripted exit plan).

    Returns:
        name -> :class:`TimingStats`. Compare configs by ratios, never across runs.

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Linear(8, 8)
        >>> stats = compare_latency({"a": net, "b": net}, torch.zeros(2, 8), reps=3, warmup=1)
        >>> sorted(stats), stats["a"].reps
        (['a', 'b'], 3)
    """
    from tqdm.auto import tqdm

    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got {reps}, {warmup}")
    batches = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    if not batches or not configs:
        raise ValueError("need at least one input batch and one config")
    names = list(configs)
    timer = _timer(batches[0].device)
    before_call = dict(before_call or {})
    times: dict[str, list[float]] = {n: [] for n in names}
    with fixed_threads(threads), torch.inference_mode():
        for r in range(warmup):
            for name in names:
                before_call.get(name, lambda: None)()
                configs[name](batches[r % len(batches)])
        bar = tqdm(range(reps), desc="timing", disable=not progress, file=sys.stderr, leave=False)
        for r in bar:
            x = batches[r % len(batches)]
            shift = r % len(names)  # rotate who goes first: no config always runs on a cold cache
            for name in names[shift:] + names[:shift]:
                before_call.get(name, lambda: None)()
                times[name].append(timer(lambda name=name, x=x: configs[name](x)))
    return {n: TimingStats.from_times(times[n], batches[0].shape[0]) for n in names}


# ------------------------------------------------------------------------------ forced exit mixes


@dataclass(frozen=True)
class ExitMix:
    """Share of a batch leaving at each path (``E`` exits then the full model); sums to 1.

    Example:
        >>> ExitMix("half at exit 0", (0.5, 0.0, 0.5)).plan(4)
        tensor([0, 0, 2, 2])
    """

    name: str
    fractions: tuple[float, ...]

    def __post_init__(self) -> None:
        if any(f < 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError(f"fractions must be >= 0 and sum to 1, got {self.fractions}")

    def plan(self, batch: int) -> Tensor:
        """Exit per row for a batch of ``batch`` (largest-remainder rounding, earliest exits first)."""
        raw = [f * batch for f in self.fractions]
        counts = [math.floor(v) for v in raw]
        for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: batch - sum(counts)]:
            counts[i] += 1
        return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))

    @property
    def pure(self) -> bool:
        """Every sample takes the same path (the only mixes a batch of 1 can show)."""
        return max(self.fractions) == 1.0


def default_mixes(num_exits: int) -> list[ExitMix]:
    """All at each exit, all to the end, half at the first exit, and an even spread.

    Example:
        >>> [m.name for m in default_mixes(2)]
        ['closed', 'all@0', 'all@1', 'half@0', 'even']
    """
    e = num_exits
    mixes = [ExitMix("closed", tuple([0.0] * e + [1.0]))]
    for i in range(e):
        mixes.append(ExitMix(f"all@{i}", tuple(1.0 if j == i else 0.0 for j in range(e + 1))))
    half = [0.0] * (e + 1)
    half[0], half[e] = 0.5, 0.5
    mixes.append(ExitMix("half@0", tuple(half)))
    mixes.append(ExitMix("even", tuple([1.0 / (e + 1)] * (e + 1))))
    return mixes


@dataclass(frozen=True)
class MixTiming:
    """Measured cost of one exit mix at one batch size, against the base model in the same loop.

    Attributes:
        mix: the mix's name; ``fractions`` its path shares.
        batch: batch size.
        mac_fraction: expected MACs of the mix (heads of open exits included) / base MACs.
        ratio_paired: median over repetitions of (wrapper time / base time in the same
            repetition): the headline ratio, robust to drifting load.
        ratio_median: median time of the wrapper / median time of the base model.
        ratio_p90: same at the 90th percentile.
        ratio_min: same for the fastest repetitions: on a machine shared with other work, noise
            only ever adds time, so this is the steadiest estimate of the intrinsic ratio.
        overhead_vs_macs: ``ratio_paired - mac_fraction``: what the time costs beyond what the MACs
            predict (hooks, gate, smaller kernels after shrinking), as a share of the base time.
        throughput_ratio: wrapped / base samples per second (``1 / ratio_paired``).
        prefix_ratio: for a mix where every sample leaves at exit ``i``: the median time of the
            *unwrapped* backbone stopped right after that exit's module over the base model's,
            paired per repetition (``None`` otherwise). Early layers often cost more time per MAC than late ones, so
            this, not ``mac_fraction``, is what a perfect wrapper would reach.
        overhead_vs_prefix: ``ratio_paired - prefix_ratio``: the wrapper's own cost at that exit
            (hooks, head, gate, assembling the answer), as a share of the base time.
        base_median_s, eem_median_s: the medians behind the ratios (seconds).
    """

    mix: str
    fractions: tuple[float, ...]
    batch: int
    mac_fraction: float
    ratio_paired: float
    ratio_median: float
    ratio_p90: float
    ratio_min: float
    overhead_vs_macs: float
    throughput_ratio: float
    base_median_s: float
    eem_median_s: float
    prefix_ratio: float | None = None
    overhead_vs_prefix: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _StopAt(Exception):
    """Raised by a hook to end a truncated forward pass."""


def _truncated(model: nn.Module, module_name: str) -> Callable[[Tensor], None]:
    """``f(x)``: the base model run up to and including ``module_name``, then stopped."""
    module = model.get_submodule(module_name)

    def stop(m: nn.Module, args: object, output: object) -> None:
        raise _StopAt

    def run(x: Tensor) -> None:
        handle = module.register_forward_hook(stop)
        try:
            model(x)
        except _StopAt:
            pass
        finally:
            handle.remove()

    return run


def bench_exit_mixes(
    model: nn.Module,
    *,
    input_size: tuple[int, int, int] | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    mixes: Sequence[ExitMix] | None = None,
    reps: int | Mapping[int, int] = 10,
    warmup: int = 1,
    threads: int | None = None,
    exits: str | Sequence[str | int] = "auto",
    head: str = "linear",
    num_exits: int = 4,
    progress: bool = False,
    seed: int = 0,
) -> tuple[list[MixTiming], Any]:
    """Time a model wrapped with forced exit mixes against the model itself.

    The model is wrapped here with a :class:`ScriptedExitGate` (the caller's wrappers are not
    touched). For each batch size, the base model and every mix are timed in one interleaved loop.
    Mixes that split a batch are skipped at batch size 1.

    Returns:
        ``(timings, eem)``: one :class:`MixTiming` per (batch size, mix), and the wrapper used
        (its ``exits`` name the modules; remove it with ``eem.remove()`` when done).

    Example:
        >>> import timm
        >>> m = timm.create_model("resnet18", num_classes=10).eval()
        >>> rows, eem = bench_exit_mixes(m, input_size=(3, 32, 32), batch_sizes=[2], reps=2)
        >>> rows[0].mix, rows[0].batch
        ('closed', 2)
    """
    from ..wrapping import wrap

    gate = ScriptedExitGate()
    eem = wrap(model, exits=exits, head=head, gate=gate, input_size=input_size, num_exits=num_exits)
    e = eem.num_exits
    mixes = list(mixes) if mixes is not None else default_mixes(e)
    for mix in mixes:
        if len(mix.fractions) != e + 1:
            raise ValueError(f"mix {mix.name!r} has {len(mix.fractions)} shares; expected {e + 1}")
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    rows: list[MixTiming] = []
    for b in batch_sizes:
        x = torch.randn(b, *eem.input_size, generator=generator).to(param.device, param.dtype)
        chosen = [m for m in mixes if b > 1 or m.pure]
        configs: dict[str, Callable[[Tensor], Any]] = {"base": model}
        setups: dict[str, Callable[[], None]] = {}
        fractions: dict[str, float] = {}
        for mix in chosen:
            plan = mix.plan(b)
            thresholds = [0.5 if i in set(plan.tolist()) else math.inf for i in range(e)]
            costs = eem.path_macs(thresholds)
            fractions[mix.name] = float(sum(costs[int(p)] for p in plan)) / (b * eem.base_macs)

            # The plan lives on the model's device: copying it there inside the timed call would
            # add a host-device transfer (and sync) that real gates do not pay.
            device_plan = plan.to(param.device)

            def setup(plan: Tensor = device_plan, thresholds: list[float] = thresholds) -> None:
                gate.plan = plan
                eem.set_thresholds(thresholds)

            configs[mix.name] = eem.predict
            setups[mix.name] = setup
            if len(set(plan.tolist())) == 1 and int(plan[0]) < e:
                # The unwrapped backbone stopped at the same exit: what a free wrapper would cost.
                configs[f"prefix@{int(plan[0])}"] = _truncated(model, eem.exits[int(plan[0])].name)
        n_reps = reps[b] if isinstance(reps, Mapping) else reps
        stats = compare_latency(
            configs,
            x,
            reps=n_reps,
            warmup=warmup,
            threads=threads,
            progress=progress,
            before_call=setups,
        )
        base = stats["base"]
        for mix in chosen:
            s = stats[mix.name]
            ratio = s.median_s / base.median_s
            plan = mix.plan(b)
            prefix = stats.get(f"prefix@{int(plan[0])}") if len(set(plan.tolist())) == 1 else None
            prefix_ratio = None if prefix is None else prefix.paired_ratio(base)
            paired = s.paired_ratio(base)
            rows.append(
                MixTiming(
                    mix=mix.name,
                    fractions=mix.fractions,
                    batch=b,
                    mac_fraction=fractions[mix.name],
                    ratio_paired=paired,
                    ratio_median=ratio,
                    ratio_p90=s.p90_s / base.p90_s,
                    ratio_min=s.min_s / base.min_s,
                    overhead_vs_macs=paired - fractions[mix.name],
                    throughput_ratio=1.0 / paired,
                    base_median_s=base.median_s,
                    eem_median_s=s.median_s,
                    prefix_ratio=prefix_ratio,
                    overhead_vs_prefix=None if prefix_ratio is None else paired - prefix_ratio,
                )
            )
    return rows, eem


def stream_latency(
    eem: Any,
    samples: Tensor,
    *,
    batch: int = 32,
    reps_b1: int = 30,
    reps_batched: int = 5,
    warmup: int = 2,
    threads: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Latency and throughput of ``eem`` at its current thresholds vs its base model, on real samples.

    Batch 1 cycles through ``samples`` one at a time (each repetition serves the same sample to
    both), so the wrapper's time reflects the stream's real exit mix; since that mix makes the
    wrapper's latency bimodal, the headline ``latency_ratio_b1`` is the ratio of *means* (the
    expected latency), with the median and p90 ratios beside it. Throughput serves batches of
    ``batch`` samples.

    Returns:
        ``latency_ratio_b1``, ``latency_ratio_b1_median``, ``latency_ratio_b1_p90``,
        ``throughput_ratio`` (wrapped / unwrapped samples per second: above 1 is faster), and the
        raw medians in seconds.

    Example:
        >>> stream_latency(eem, images[:64], reps_b1=10, reps_batched=2)  # doctest: +SKIP
        {'latency_ratio_b1': 0.62, ...}
    """
    if samples.dim() != 4 or samples.shape[0] == 0:
        raise ValueError("samples must be a non-empty [N, C, H, W] batch")
    model = eem.base_model
    singles = [samples[i : i + 1] for i in range(min(samples.shape[0], reps_b1))]
    b1 = compare_latency(
        {"base": model, "eem": eem.predict},
        singles,
        reps=reps_b1,
        warmup=warmup,
        threads=threads,
        progress=progress,
    )
    batches = [samples[i : i + batch] for i in range(0, samples.shape[0], batch)]
    batches = [b for b in batches if b.shape[0] == batch] or [samples[:batch]]
    bb = compare_latency(
        {"base": model, "eem": eem.predict},
        batches,
        reps=reps_batched,
        warmup=1,
        threads=threads,
        progress=progress,
    )
    return {
        "latency_ratio_b1": b1["eem"].mean_s / b1["base"].mean_s,
        "latency_ratio_b1_median": b1["eem"].median_s / b1["base"].median_s,
        "latency_ratio_b1_p90": b1["eem"].p90_s / b1["base"].p90_s,
        "throughput_ratio": bb["base"].median_s / bb["eem"].median_s,
        "base_b1_median_s": b1["base"].median_s,
        "eem_b1_median_s": b1["eem"].median_s,
        "base_batched_median_s": bb["base"].median_s,
        "eem_batched_median_s": bb["eem"].median_s,
        "batch": float(batches[0].shape[0]),
        "threads": float(torch.get_num_threads() if threads is None else threads),
    }
