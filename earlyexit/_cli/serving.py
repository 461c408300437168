"""Flags and output shared by ``demo`` and ``run`` (both serve a stream while learning)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from .._json import from_json_float
from .common import parse_exits, positive_int, table


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    """Target agreement, exits, head, gate, seed and evaluation switches."""
    from ..gates import gate_names
    from ..heads import head_kinds

    group = parser.add_argument_group("learning and gating")
    group.add_argument(
        "--target-agreement",
        type=_unit_interval,
        default=0.99,
        metavar="P",
        help="agreement with the full model that exiting samples must keep (default 0.99)",
    )
    group.add_argument(
        "--confidence",
        type=_unit_interval,
        default=0.95,
        metavar="P",
        help="probability that the agreement guarantee holds (default 0.95)",
    )
    group.add_argument(
        "--exits",
        type=parse_exits,
        default="auto",
        metavar="LIST",
        help="'auto' (default: spread by MACs) or comma-separated module names / candidate indices",
    )
    group.add_argument(
        "--num-exits",
        type=positive_int,
        default=4,
        metavar="N",
        help="exits 'auto' places (default 4)",
    )
    group.add_argument(
        "--head",
        choices=(*head_kinds(), "auto"),
        default="conv",
        help="exit head kind (default conv: a small conv on a 4x4 pooled grid; it saved the most"
        " MACs at 0.99 agreement on the fashion workload, while linear heads, cheaper to train"
        " within the learning budget, saved more on digits: see the README), or 'auto': the"
        " first --choice-samples samples are served by the full model while linear and conv"
        " heads learn at every place, then each place keeps the kind that saves the most MACs"
        " at the target, or none",
    )
    group.add_argument(
        "--choice-samples",
        type=positive_int,
        default=2048,
        metavar="N",
        help="samples --head auto watches before choosing (default 2048)",
    )
    group.add_argument(
        "--gate",
        choices=gate_names(),
        default="learned",
        help="gate score: 'learned' (default) lets the learner fit a gate from the agreement it "
        "sees (log-odds that a head agrees with the full model); any other keeps that fixed rule",
    )
    group.add_argument(
        "--head-cost",
        choices=("macs", "time"),
        default="macs",
        help="how exit selection prices a head: 'macs' (default, deterministic) or 'time' "
        "(its measured batch-1 time share: on small CPU backbones heads cost more time than MACs)",
    )
    group.add_argument(
        "--seed", type=int, default=0, help="seed for traffic, audits and replay (default 0)"
    )
    group.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        metavar="N",
        help="serving batch size (default 32)",
    )
    group.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="CPU threads for torch (default: torch's, one per core); use 1 when another job "
        "shares the cores: oversubscribed threads can run many times slower",
    )
    group.add_argument(
        "--no-latency",
        action="store_true",
        help="skip the wall-clock latency/throughput measurement",
    )
    group.add_argument(
        "--baseline",
        action="store_true",
        help="also train SDN heads offline with the traffic's labels and compare (labelled data; slower)",
    )


def options_from_args(args: argparse.Namespace) -> Any:
    from ..evaluation.pipeline import PipelineOptions

    return PipelineOptions(
        target_agreement=args.target_agreement,
        confidence=args.confidence,
        exits=args.exits,
        num_exits=args.num_exits,
        head=args.head,
        choice_samples=args.choice_samples,
        gate=args.gate,
        batch_size=args.batch_size,
        seed=args.seed,
        latency=not args.no_latency,
        sdn_baseline=args.baseline,
        progress=not args.no_progress,
        threads=args.threads,
        distill={} if args.head_cost == "macs" else {"head_cost": args.head_cost},
    )


def print_outcome(result: Any) -> None:
    """The summary table and where the files are (stdout)."""
    print(summary_table(result.report))
    learner = result.report.get("learner", {})
    reasons = dict.fromkeys(
        e["reason"] for e in learner.get("exits", []) if e.get("state") != "open"
    )
    for reason in reasons:  # why gates are closed, once per distinct reason
        print(f"note: {reason}")
    print()
    for kind, path in sorted(result.paths.items()):
        print(f"{kind:>4}: {path}")
    took = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    print(f"time: {took}")


def summary_table(report: dict[str, Any]) -> str:
    """The headline figures of a report as a plain-text table (what ``demo`` prints)."""

    def pct(v: Any) -> str:
        return "-" if v is None else f"{v:.1%}"

    def ratio(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}x"

    rows = []
    for e in report["exits"]:
        thr = from_json_float(e["threshold"])
        rows.append(
            [
                e["name"],
                "closed" if thr == math.inf else f"{thr:.4f}",
                pct(e["exit_rate"]),
                pct(e["agreement"]),
                pct(e["path_mac_fraction"]),
            ]
        )
    rows.append(["full model", "-", pct(report["final"]["exit_rate"]), "100.0%", "100.0%"])
    per_exit = table(rows, ["exit", "threshold", "exit rate", "agreement", "MACs of path"])
    overall = [
        ["agreement with the full model", pct(report["agreement"])],
        [
            "accuracy: full model / early exit",
            f"{pct(report['accuracy_full'])} / {pct(report['accuracy_early'])}",
        ],
        ["MAC saving", pct(report["mac_saving"])],
        ["oracle MAC saving", pct(report["oracle_mac_saving"])],
        ["share of the oracle's saving", pct(report.get("saving_of_oracle"))],
        ["latency ratio, batch 1 (wrapped / base)", ratio(report["latency_ratio_b1"])],
        ["throughput ratio, batched (wrapped / base)", ratio(report["throughput_ratio"])],
    ]
    learner = report.get("learner") or {}
    if "first_early_exit_at" in learner:
        first = learner["first_early_exit_at"]
        served = learner.get("samples")
        overall.append(
            [
                "traffic served before the first early exit",
                "none left early" if first is None else f"{first} of {served}",
            ]
        )
    return per_exit + "\n\n" + table(overall, ["held-out evaluation", "value"])
