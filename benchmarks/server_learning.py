"""Learning under server load, in-process: a background learner fed small batches, as the server
feeds it.

``earlyexit serve`` batches concurrent requests dynamically (``--max-wait-ms 0``), so under load
the learner sees many small batches (about 4 samples each with 8 clients) on one serving thread,
while its background thread trains and calibrates. This script reproduces that without HTTP: the
fine-tuned EfficientNet-Lite0 of the fashion workload, wrapped as ``earlyexit serve`` wraps it, and
an :class:`~earlyexit.OnlineDistiller` in background mode with the server's config, fed the
Fashion-MNIST test images (the same first ``--distinct`` images of a seeded order that
``benchmarks/serve_load.py`` sends, repeated) in batches of ``--min-batch`` to ``--max-batch``
(seeded), back to back, for ``--samples`` samples. It reports:

* samples (and seconds) until the first gate opened, the MAC saving over the last ~2048 samples
  and over the whole run, the learner's audited agreement (pooled over exits) at the end;
* the agreement with the full model of the final policy on images never served (the rest of the
  test split), and its MAC saving there;
* train steps, calibrations, evidence kept vs what the calibrator needs, the learning cost as a
  share of serving time (the learner's own clocks; over the whole run and over its second half),
  and the calibration reports' reasons;
* the serving thread's overhead at batch 1: the median wall-clock of ``learner.step(x)`` minus
  that of ``eem(x)`` on the same single images, alternated, in the state the run ended in;
* a timeline (every ``--every`` samples): saving, thresholds open, train steps, evidence.

Usage:
    python benchmarks/server_learning.py                     # 30,000 samples, ~4 min
    python benchmarks/server_learning.py --samples 8000 --out /tmp/s.json
    python benchmarks/server_learning.py --set train_time_budget=0.25

Results go to ``benchmarks/results/server_learning.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from earlyexit.distill import DistillConfig, OnlineDistiller
from earlyexit.evaluation import record_stream
from earlyexit.evaluation.pipeline import PipelineOptions
from earlyexit.evaluation.policies import evaluate_exits
from earlyexit.evaluation.workloads._fashion import (
    FASHION_INPUT_SIZE,
    fashion_order,
    fashion_preprocess,
    load_fashion_backbone,
    read_fashion_split,
)

RESULTS = Path(__file__).resolve().parent / "results"


def parse_setting(text: str) -> tuple[str, Any]:
    """``name=value`` for a DistillConfig field (``none`` is None; numbers are numbers)."""
    name, _, raw = text.partition("=")
    value: Any = raw
    if raw.lower() == "none":
        value = None
    elif raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                pass
    return name, value


def server_learner(settings: dict[str, Any]) -> OnlineDistiller:
    """The fashion model wrapped and learned as ``earlyexit serve`` does (see ``_cli/serve.py``)."""
    model = load_fashion_backbone()
    options = PipelineOptions()
    eem = options.wrap(model, FASHION_INPUT_SIZE)
    config = DistillConfig(
        target_agreement=0.99,
        confidence=options.confidence,
        seed=options.seed,
        gate="learned" if options.gate == "learned" else "fixed",
        background=True,
        **settings,
    )
    return OnlineDistiller(eem, config)


def pooled_audits(learner: OnlineDistiller) -> dict[str, Any]:
    """Audited early answers in the drift monitor's windows, pooled over exits."""
    stats = learner.stats()
    agreed = total = 0
    for window in learner.drift.windows:
        total += len(window)
        agreed += sum(bool(v) for v in window)
    return {
        "audited": total,
        "agreement": agreed / total if total else None,
        "per_exit": stats["audited_agreement"],
    }


def second_half_share(timeline: list[dict[str, Any]]) -> float | None:
    """Learning seconds over serving seconds between the timeline's middle entry and its last."""
    if len(timeline) < 2:
        return None
    mid, last = timeline[len(timeline) // 2], timeline[-1]
    served = last["serve_seconds"] - mid["serve_seconds"]
    return (last["learn_seconds"] - mid["learn_seconds"]) / served if served > 0 else None


def batch1_overhead(learner: OnlineDistiller, images: list[torch.Tensor]) -> dict[str, float]:
    """Median ``learner.step(x)`` minus median ``eem(x)`` on single images, alternated."""
    eem = learner.eem
    step_s, direct_s = [], []
    with torch.no_grad():
        for x in images:
            started = time.perf_counter()
            eem(x)
            direct_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            learner.step(x)
            step_s.append(time.perf_counter() - started)
    step, direct = statistics.median(step_s), statistics.median(direct_s)
    return {
        "step_p50_ms": 1e3 * step,
        "direct_p50_ms": 1e3 * direct,
        "overhead_ms": 1e3 * (step - direct),
        "samples": len(images),
    }


def held_out_policy(learner: OnlineDistiller, images: torch.Tensor) -> dict[str, Any]:
    """The final policy on images never served: agreement with the full model and MAC saving."""
    record = record_stream(learner.eem, images, batch_size=64)
    served = evaluate_exits(record, record.served_exit, thresholds=record.recorded_thresholds)
    return {
        "samples": record.num_samples,
        "agreement": served.agreement,
        "mac_saving": served.mac_saving,
        "exit_rates": served.exit_rates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=30000, help="samples to serve")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--distinct", type=int, default=4000, help="distinct images sent")
    parser.add_argument("--held-out", type=int, default=2000, help="never-served images to test")
    parser.add_argument("--batch1", type=int, default=300, help="single images timed at the end")
    parser.add_argument("--every", type=int, default=2000, help="timeline step (samples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS / "server_learning.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = dict(parse_setting(s) for s in args.set)

    images, _ = read_fashion_split("test")
    order = fashion_order(len(images), seed=0)  # serve_load.py's order
    traffic = fashion_preprocess(images[order[: args.distinct]])
    unseen = fashion_preprocess(images[order[args.distinct : args.distinct + args.held_out]])
    rng = np.random.default_rng(args.seed)

    learner = server_learner(settings)
    need = learner.calibrator.evidence_needed()
    timeline: list[dict[str, Any]] = []
    first_open: dict[str, float] | None = None
    served, position, next_mark = 0, 0, args.every
    started = time.perf_counter()
    while served < args.samples:
        size = int(rng.integers(args.min_batch, args.max_batch + 1))
        rows = [(position + i) % len(traffic) for i in range(size)]
        position = (position + size) % len(traffic)
        learner.step(traffic[rows])
        served += size
        if first_open is None and any(t < math.inf for t in learner.eem.thresholds):
            first_open = {"samples": served, "seconds": time.perf_counter() - started}
        if served >= next_mark:
            next_mark += args.every
            s = learner.stats()
            timeline.append(
                {
                    "samples": served,
                    "seconds": round(time.perf_counter() - started, 1),
                    "mac_saving": round(s["mac_saving"], 4),
                    "open": sum(t < math.inf for t in s["thresholds"]),
                    "train_steps": s["train_steps"],
                    "evidence": s["evidence"],
                    "calibrations": s["calibrations"],
                    "serve_seconds": round(learner.schedule.serve_seconds, 2),
                    "learn_seconds": round(learner.schedule.learn_seconds, 2),
                    "learn_share": round(
                        learner.schedule.learn_seconds / max(learner.schedule.serve_seconds, 1e-9),
                        4,
                    ),
                }
            )
            print(json.dumps(timeline[-1]), flush=True)
    run_seconds = time.perf_counter() - started
    stats = learner.stats()
    schedule = learner.schedule
    report: dict[str, Any] = {
        "command": "benchmarks/server_learning.py " + " ".join(sys.argv[1:]),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": args.threads,
        "config": learner.config.to_dict(),
        "samples": served,
        "batches_of": [args.min_batch, args.max_batch],
        "distinct_images": args.distinct,
        "run_seconds": run_seconds,
        "samples_per_s": served / run_seconds,
        "first_gate_open": first_open,
        "mac_saving": stats["mac_saving"],
        "mac_saving_total": stats["mac_saving_total"],
        "thresholds": stats["thresholds"],
        "audited": pooled_audits(learner),
        "train_steps": stats["train_steps"],
        "calibrations": stats["calibrations"],
        "evidence": stats["evidence"],
        "evidence_needed": need,
        "serve_seconds": schedule.serve_seconds,
        "learn_seconds": schedule.learn_seconds,
        "learn_share_of_serving": schedule.learn_seconds / max(schedule.serve_seconds, 1e-9),
        "exits": [{"state": str(e["state"]), "reason": e["reason"]} for e in stats["exits"]],
        # Learning cost once the first gate had been open a while: the last half of the run.
        "learn_share_second_half": second_half_share(timeline),
        "timeline": timeline,
    }
    report["batch1"] = batch1_overhead(learner, [traffic[i : i + 1] for i in range(args.batch1)])
    learner.sync()
    learner.close()
    report["held_out_policy"] = held_out_policy(learner, unseen)
    for key in ("first_gate_open", "mac_saving", "mac_saving_total", "audited", "train_steps"):
        print(f"{key}: {report[key]}")
    for key in (
        "calibrations",
        "evidence",
        "evidence_needed",
        "learn_share_of_serving",
        "learn_share_second_half",
    ):
        print(f"{key}: {report[key]}")
    print(f"batch1: {report['batch1']}")
    print(f"held_out_policy: {report['held_out_policy']}")
    for e, entry in enumerate(report["exits"]):
        print(f"exit {e}: {entry['state']}: {entry['reason']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
