"""The main job end to end: wrap, serve a stream while learning, evaluate on held-out traffic.

``earlyexit demo`` (embedded workloads) and ``earlyexit run`` (your model and images) are thin
command-line layers over :func:`serve_and_evaluate`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._json import json_safe
from ..distill import DistillConfig, OnlineDistiller
from ..wrapping import wrap
from .report import tradeoff_report, write_report
from .stream import iterate_batches


@dataclass
class PipelineOptions:
    """The knobs of one end-to-end run (the CLI's flags)."""

    target_agreement: float = 0.99
    confidence: float = 0.95
    exits: str | list[str | int] = "auto"
    num_exits: int = 4
    head: str = "conv"  # best at 0.99 on fashion (3 seeds); linear is better on digits (README)
    gate: str = "learned"  # any other gate is kept fixed (DistillConfig(gate="fixed"))
    batch_size: int = 32
    seed: int = 0
    latency: bool = True
    sdn_baseline: bool = False
    progress: bool = True
    threads: int | None = None  # torch CPU threads for the whole run (None: leave as is)
    distill: dict[str, Any] = field(default_factory=dict)  # extra DistillConfig fields

    def wrap(self, model: nn.Module, input_size: tuple[int, int, int] | None = None) -> Any:
        """``model`` wrapped with these options' exits, head and gate (what ``run``, ``demo`` and
        ``serve`` serve)."""
        return wrap(
            model,
            exits=self.exits,
            head=self.head,
            gate=self.gate,
            num_exits=self.num_exits,
            input_size=input_size,
        )

    def distill_config(self) -> DistillConfig:
        """The learner's configuration for these options (what ``run`` and ``demo`` learn with):
        target, confidence, seed and gate from the options, then ``distill``'s fields on top.

        Example:
            >>> PipelineOptions(distill={"batch_size": 32}).distill_config().batch_size
            32
        """
        # No wall-clock training budget by default: the same seed gives the same run on a fast or
        # a busy machine (the budget is for serving in production, where latency matters more).
        return DistillConfig(
            **{
                "target_agreement": self.target_agreement,
                "confidence": self.confidence,
                "seed": self.seed,
                "train_time_budget": None,
                "gate": "learned" if self.gate == "learned" else "fixed",
                **self.distill,
            }
        )


@dataclass
class PipelineResult:
    """What a run produced: the report, where it was written, the learner and timings."""

    report: dict[str, Any]
    paths: dict[str, Path]
    learner: OnlineDistiller
    seconds: dict[str, float]


def _progress_line(stats: dict[str, Any]) -> str:
    rates = "/".join(f"{r:.0%}" for r in stats["exit_rates"])
    agreements = [a for a in stats["audited_agreement"] if a is not None]
    agreement = f"{min(agreements):.3f}" if agreements else "-"
    return (
        f"{stats['phase']}, exits {rates}, audited agreement (worst exit) {agreement}, "
        f"MAC saving {stats['mac_saving']:.1%}"
    )


def serve_stream(
    learner: OnlineDistiller,
    traffic: Any,
    *,
    batch_size: int,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, Any]:
    """Stream ``traffic`` through ``learner.step`` (serving and learning); returns its stats.

    A live progress line on stderr shows samples, exit rates, audited agreement and MAC saving.
    The stats gain ``first_early_exit_at``: traffic samples served before the batch in which a
    sample first left early (``None`` if none did), i.e. how long the traffic paid in full.
    """
    from tqdm.auto import tqdm

    size = total if total is not None else (len(traffic) if hasattr(traffic, "__len__") else None)
    bar = tqdm(
        total=size, desc="serving + learning", unit="img", file=sys.stderr, disable=not progress
    )
    served = 0
    first_early_exit_at: int | None = None
    try:
        for x, _labels in iterate_batches(traffic, batch_size=batch_size):
            result = learner.step(x)  # labels, if any, are never shown to the learner
            if first_early_exit_at is None and bool(
                (result.exit_index < learner.eem.num_exits).any()
            ):
                first_early_exit_at = served
            served += x.shape[0]
            bar.update(x.shape[0])
            bar.set_postfix_str(_progress_line(learner.stats()), refresh=False)
        learner.sync()
    finally:
        bar.close()
    return {**learner.stats(), "first_early_exit_at": first_early_exit_at}


def serve_and_evaluate(
    model: nn.Module,
    traffic: Any,
    evaluation: Any,
    *,
    labelled: bool,
    out_dir: str | Path,
    name: str = "report",
    model_name: str | None = None,
    stream_meta: dict[str, Any] | None = None,
    options: PipelineOptions | None = None,
    input_size: tuple[int, int, int] | None = None,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> PipelineResult:
    """Wrap ``model``, serve ``traffic`` while learning online, then evaluate on ``evaluation``.

    The evaluation split is never learned from. When ``labelled`` and ``options.sdn_baseline``,
    the SDN baseline trains heads with the traffic's labels (the online learner never sees them).
    Writes ``NAME.json``, ``NAME.md`` and ``NAME.png`` into ``out_dir``.

    Example:
        >>> from earlyexit.evaluation.workloads import load_workload
        >>> w = load_workload("digits")  # doctest: +SKIP
        >>> res = serve_and_evaluate(w.model, w.traffic, w.evaluation, labelled=True, out_dir="out")  # doctest: +SKIP
        >>> res.report["mac_saving"]  # doctest: +SKIP
    """
    opts = options or PipelineOptions()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    eem = opts.wrap(model, input_size)
    seconds["wrap"] = time.perf_counter() - start
    log(
        f"wrapped {model_name or type(model).__name__}: {eem.num_exits} exits at "
        + ", ".join(
            f"{e.name} ({m / eem.base_macs:.0%} of MACs)"
            for e, m in zip(eem.exits, eem.backbone_macs, strict=True)
        )
    )
    learner = OnlineDistiller(eem, opts.distill_config())
    start = time.perf_counter()
    stats = serve_stream(learner, traffic, batch_size=opts.batch_size, progress=opts.progress)
    seconds["serve_and_learn"] = time.perf_counter() - start
    log(
        f"served {stats['samples']} samples while learning; thresholds {_fmt_thresholds(eem.thresholds)}"
    )

    start = time.perf_counter()
    report = tradeoff_report(
        eem,
        evaluation,
        train_data=traffic if (labelled and opts.sdn_baseline) else None,
        sdn_target=opts.target_agreement,
        latency=opts.latency,
        batch_size=opts.batch_size,
        model_name=model_name,
        stream_meta=stream_meta,
        progress=opts.progress,
        notes=[
            "online heads: trained label-free by self-distillation while serving the traffic split",
            f"operating point: calibrated online to agreement >= {opts.target_agreement} "
            f"with confidence {opts.confidence}",
        ],
    )
    seconds["evaluate"] = time.perf_counter() - start
    report["learner"] = json_safe(stats)
    report["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    paths = write_report(report, out_dir, name)
    return PipelineResult(report, paths, learner, seconds)


def _fmt_thresholds(thresholds: tuple[float, ...]) -> str:
    return "[" + ", ".join("closed" if t == float("inf") else f"{t:.3f}" for t in thresholds) + "]"
