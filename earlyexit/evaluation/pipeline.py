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
from ..distill.head_choice import HeadChoice, HeadChooser
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
    # "auto": places and kinds chosen on the first ``choice_samples`` of traffic (HeadChooser);
    # a kind name: every exit gets it (conv is best at 0.99 on fashion, linear on digits: README).
    head: str = "conv"
    head_kinds: tuple[str, ...] = ("linear", "conv")  # the candidates of head="auto"
    choice_samples: int = 2048
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

    def chooser(
        self,
        model: nn.Module,
        input_size: tuple[int, int, int] | None = None,
        config: DistillConfig | None = None,
    ) -> Any:
        """A :class:`~earlyexit.distill.head_choice.HeadChooser` for ``head="auto"``: these
        options' candidate places, kinds and gate, learning as ``config`` says (default:
        :meth:`distill_config`; pass the config of the learner that will take over)."""
        return HeadChooser(
            model,
            kinds=self.head_kinds,
            exits=self.exits,
            num_exits=self.num_exits,
            samples=self.choice_samples,
            config=config if config is not None else self.distill_config(),
            input_size=input_size,
            gate=self.gate,
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


@dataclass
class OnlineRun:
    """A learner after serving a stream, its stats and, with ``head="auto"``, the head choice.

    ``stats`` covers the whole stream: with a choice, ``samples``, ``first_early_exit_at`` and
    ``learning_cost`` count the samples the chooser served (full model) and its learning MACs;
    ``head_choice`` is :meth:`HeadChoice.as_dict`.
    """

    learner: OnlineDistiller
    stats: dict[str, Any]
    choice: HeadChoice | None


def learn_online(
    model: nn.Module,
    traffic: Any,
    options: PipelineOptions,
    input_size: tuple[int, int, int] | None = None,
    *,
    total: int | None = None,
) -> OnlineRun:
    """Wrap ``model`` as ``options`` say and serve ``traffic`` while learning. With
    ``options.head == "auto"`` the first ``options.choice_samples`` samples are served by the
    full model while a :class:`HeadChooser` picks places and head kinds; the learner serves the
    rest with the chosen heads, already trained.

    Example:
        >>> run = learn_online(w.model, w.traffic, PipelineOptions(head="auto"))  # doctest: +SKIP
        >>> run.choice.kinds, run.stats["mac_saving"]  # doctest: +SKIP
    """
    config = options.distill_config()
    if options.head != "auto":
        learner = OnlineDistiller(options.wrap(model, input_size), config)
        stats = serve_stream(
            learner, traffic, batch_size=options.batch_size, progress=options.progress, total=total
        )
        return OnlineRun(learner, stats, None)
    size = total if total is not None else (len(traffic) if hasattr(traffic, "__len__") else None)
    chooser = options.chooser(model, input_size)
    batches = iterate_batches(traffic, batch_size=options.batch_size)
    for x, _labels in batches:  # labels, if any, are never shown to the chooser
        chooser.step(x)
        if chooser.done:
            break
    choice = chooser.finish()
    learner = OnlineDistiller(chooser.wrap(), config)
    # The heads carry on: replay, optimizer state, and the held-out rows the choice was not
    # priced on as the learner's first evidence.
    learner.take_over(chooser.handover())
    adopted = len(learner.evidence)
    rest = None if size is None else max(size - choice.samples, 0)
    stats = serve_stream(
        learner, batches, batch_size=options.batch_size, progress=options.progress, total=rest
    )
    return OnlineRun(learner, with_choice(stats, choice, adopted), choice)


def with_choice(stats: dict[str, Any], choice: HeadChoice, adopted: int = 0) -> dict[str, Any]:
    """``stats`` of the learner that took over from ``choice``, counted over the whole stream:
    samples, the first early exit and the learning cost include what the chooser served and
    spent (the learner's own figures stay under ``learner_only``); ``adopted``: evidence rows
    the learner took over from the chooser."""
    out = dict(stats)
    out["learner_only"] = {
        k: stats.get(k) for k in ("samples", "first_early_exit_at", "learning_cost")
    }
    out["head_choice"] = {**choice.as_dict(), "evidence_handed_over": adopted}
    out["samples"] = stats["samples"] + choice.samples
    for key in (
        "first_early_exit_at",
        "first_saving_at",
        "first_gate_open_at",
        "first_open_sample",
    ):
        if stats.get(key) is not None:
            out[key] = stats[key] + choice.samples
    cost = stats.get("learning_cost")
    if isinstance(cost, dict) and cost.get("served_macs") is not None:
        served = cost["served_macs"] + choice.served_macs
        learned = cost["train_macs"] + cost["calibration_macs"] + choice.learning_macs
        out["learning_cost"] = {
            **cost,
            "train_macs": cost["train_macs"] + choice.learning_macs,
            "served_macs": served,
            "macs_ratio_total": learned / served if served else None,
        }
    return out


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
    run = learn_online(model, traffic, opts, input_size)
    seconds["serve_and_learn"] = time.perf_counter() - start
    learner, stats, eem = run.learner, run.stats, run.learner.eem
    if run.choice is not None:
        log(f"head choice on the first {run.choice.samples} samples: {run.choice.reason}")
    log(
        f"wrapped {model_name or type(model).__name__}: {eem.num_exits} exits at "
        + ", ".join(
            f"{e.name} ({kind} head, {m / eem.base_macs:.0%} of MACs)"
            for e, kind, m in zip(eem.exits, eem.head_kinds, eem.backbone_macs, strict=True)
        )
    )
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
