"""Measurement: MACs, latency, metrics, sweeps, reports, plots, reference workloads.

Example:
    >>> from earlyexit.evaluation import record_stream, evaluate_policy
    >>> rec = record_stream(eem, images, labels=labels)  # doctest: +SKIP
    >>> evaluate_policy(rec, "threshold", thresholds=eem.thresholds).mac_saving  # doctest: +SKIP
"""

from ..costs.macs import MacCounter, MacReport, count_macs, fvcore_macs
from .baselines import (
    OfflineRecipe,
    best_at_agreement,
    calibrate_greedy,
    compare_methods,
    converge_heads,
    first_threshold_reaching,
    offline_recipe,
    train_heads,
)
from .breakdown import ExitCost, MacBreakdown, mac_breakdown
from .latency import (
    ExitMix,
    MixTiming,
    ScriptedExitGate,
    TimingStats,
    bench_exit_mixes,
    compare_latency,
    default_mixes,
    fixed_threads,
    stream_latency,
)
from .plot import plot_tradeoff
from .policies import (
    PolicyPoint,
    evaluate_exits,
    evaluate_policy,
    oracle_exits,
    patience_exits,
    sweep_patience,
    sweep_thresholds,
    threshold_exits,
)
from .report import (
    REQUIRED_KEYS,
    build_report,
    load_report,
    model_meta,
    render_markdown,
    tradeoff_report,
    write_report,
)
from .stream import StreamRecord, iterate_batches, record_stream

__all__ = [
    "REQUIRED_KEYS",
    "ExitCost",
    "ExitMix",
    "MacBreakdown",
    "MacCounter",
    "MacReport",
    "MixTiming",
    "OfflineRecipe",
    "PolicyPoint",
    "ScriptedExitGate",
    "StreamRecord",
    "TimingStats",
    "bench_exit_mixes",
    "best_at_agreement",
    "build_report",
    "calibrate_greedy",
    "compare_latency",
    "compare_methods",
    "converge_heads",
    "count_macs",
    "default_mixes",
    "evaluate_exits",
    "evaluate_policy",
    "first_threshold_reaching",
    "fixed_threads",
    "fvcore_macs",
    "iterate_batches",
    "load_report",
    "mac_breakdown",
    "model_meta",
    "offline_recipe",
    "oracle_exits",
    "patience_exits",
    "plot_tradeoff",
    "record_stream",
    "render_markdown",
    "stream_latency",
    "sweep_patience",
    "sweep_thresholds",
    "threshold_exits",
    "tradeoff_report",
    "train_heads",
    "write_report",
]
