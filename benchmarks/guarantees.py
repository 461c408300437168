"""Do the two calibration guarantees hold, and how soon does each open a gate?

Two promises are checked empirically on a reference workload (default ``digits``):

- ``high_probability`` (Learn-then-Test, :func:`earlyexit.calibration.calibrate_joint`, what the
  learner does today): agreement with the full model among early answers is ``>= target`` with
  probability ``>= confidence`` over the draw of the calibration set. Checked as: the share of
  calibrations whose early answers agree less than ``target`` on fresh test traffic must be
  ``<= 1 - confidence``.
- ``expected`` (conformal risk control, :func:`earlyexit.calibration.calibrate_risk_control`): the
  expected disagreement of a served answer (early or not) with the full model is ``<= 1 -
  target``, over the draw of the calibration set and of the new sample. Checked as: the *mean*
  over calibrations of the test disagreement among all served answers must be ``<= 1 - target``
  up to Monte-Carlo error (mean + 2 standard errors printed).

How: two learners (one per guarantee) learn heads online on the workload's traffic, which gives
``first_open_sample`` (samples served when a gate first opened) for each. The first learner's
heads and learned gate then score a pool of held-out samples once (every head on every sample,
:func:`earlyexit.evaluation.record_stream`). Each simulated calibration draws a random calibration
set of size ``n`` from the pool (without replacement) and uses the rest of the pool as test set;
both methods calibrate one shared threshold over every exit on the same set (no automatic exit
switch-off, unlike the learner), and the test set gives disagreement among all answers,
agreement among early answers, exit rate and MAC saving. For the first ``--open-reps``
calibrations, the smallest calibration-set size (prefixes of the same draw, every ``--open-step``
samples) at which each method opens a gate is recorded. Calibration and test samples drawn
without replacement from one pool are exchangeable, so both promises apply exactly to the pool's
distribution.

Results go to ``benchmarks/results/guarantees.json``.

Example:
    python benchmarks/guarantees.py --threads 1
    python benchmarks/guarantees.py --threads 1 --reps 50 --n 200 1000   # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
import earlyexit as ee
from earlyexit.calibration import (
    calibrate_joint,
    calibrate_risk_control,
    min_evidence,
    risk_control_min_evidence,
)
from earlyexit.distill import DistillConfig, OnlineDistiller
from earlyexit.evaluation import record_stream
from earlyexit.evaluation.stream import iterate_batches
from earlyexit.evaluation.workloads import load_workload
from earlyexit.routing import simulate_exits

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("high_probability", "expected")


def learn(w, guarantee: str, args: argparse.Namespace) -> tuple[ee.EarlyExitModel, dict]:
    """Stream the workload's traffic through a learner with ``guarantee``; its model and figures."""
    eem = ee.wrap(w.model.eval(), head="linear", input_size=w.input_size)
    config = DistillConfig(
        target_agreement=args.target,
        confidence=args.confidence,
        guarantee=guarantee,
        seed=args.seed,
        train_time_budget=None,  # reproducible step for step
    )
    learner = OnlineDistiller(eem, config)
    t0 = time.perf_counter()
    for x, _y in iterate_batches(w.traffic, batch_size=args.batch):
        learner.step(x)
    learner.calibrate()
    stats = learner.stats()
    return eem, {
        "guarantee": stats["guarantee"],
        "first_open_sample": stats["first_open_sample"],
        "traffic_samples": stats["samples"],
        "mac_saving_total": stats["mac_saving_total"],
        "expected_mac_saving_end": stats["expected_mac_saving"],
        "seconds": time.perf_counter() - t0,
    }


def calibrate(method: str, scores, agree, args) -> tuple[float, ...]:
    if method == "high_probability":
        return calibrate_joint(scores, agree, args.target, args.confidence).thresholds
    return calibrate_risk_control(scores, agree, args.target).thresholds


def measure(record, agree, index, thresholds) -> dict:
    """Figures of serving the samples ``index`` of the pool at ``thresholds``."""
    scores = record.scores[index]
    where = simulate_exits(scores, thresholds)
    num_exits = record.num_exits
    early = where < num_exits
    right = agree[index].gather(1, where.clamp(max=num_exits - 1)[:, None]).squeeze(1)
    wrong = early & ~right
    path = torch.tensor(record.path_macs(thresholds), dtype=torch.float64)
    exits = int(early.sum())
    return {
        "disagreement_all": float(wrong.float().mean()),
        "agreement_early": 1.0 - int(wrong.sum()) / exits if exits else math.nan,
        "exit_rate": exits / len(index),
        "mac_saving": 1.0 - float(path[where].mean()) / record.base_macs,
    }


def first_open(method: str, record, agree, perm, start: int, step: int, most: int, args):
    """Smallest prefix of ``perm`` (``start``, ``start + step``, ..) on which ``method`` opens."""
    m = start
    while m <= most:
        cal = perm[:m]
        if any(t < math.inf for t in calibrate(method, record.scores[cal], agree[cal], args)):
            return m
        m += step
    return None


def summary(values: list[float]) -> dict:
    t = torch.tensor([v for v in values if not math.isnan(v)], dtype=torch.float64)
    if t.numel() == 0:
        return {"mean": None, "se": None, "count": 0}
    se = float(t.std() / math.sqrt(t.numel())) if t.numel() > 1 else 0.0
    return {"mean": float(t.mean()), "se": se, "count": int(t.numel())}


def simulate(record, agree, args) -> dict:
    gen = torch.Generator().manual_seed(args.seed + 1)
    pool = record.num_samples
    out: dict = {}
    for n in args.n:
        if n >= pool:
            raise SystemExit(f"--n {n} must be below the pool size {pool}")
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for _ in range(args.reps):
            perm = torch.randperm(pool, generator=gen)
            cal, test = perm[:n], perm[n:]
            for method in METHODS:
                thresholds = calibrate(method, record.scores[cal], agree[cal], args)
                row = measure(record, agree, test, thresholds)
                row["opened"] = any(t < math.inf for t in thresholds)
                runs[method].append(row)
        out[str(n)] = {}
        for method in METHODS:
            rows = runs[method]
            early = [r["agreement_early"] for r in rows]
            violations = sum(1 for a in early if not math.isnan(a) and a < args.target)
            served = sorted(r["disagreement_all"] for r in rows)
            out[str(n)][method] = {
                "open_share": sum(r["opened"] for r in rows) / len(rows),
                "disagreement_all": summary([r["disagreement_all"] for r in rows]),
                "agreement_early": summary(early),
                "violation_share": violations / len(rows),
                # CRC bounds the mean only: how often one calibration serves more than the bound.
                "disagreement_all_above_bound_share": sum(d > 1.0 - args.target for d in served)
                / len(rows),
                "disagreement_all_p95": served[min(len(served) - 1, int(0.95 * len(served)))],
                "exit_rate": summary([r["exit_rate"] for r in rows]),
                "mac_saving": summary([r["mac_saving"] for r in rows]),
            }
    opens: dict[str, list[int | None]] = {m: [] for m in METHODS}
    starts = {
        "high_probability": min_evidence(args.target, 1.0 - args.confidence, 1),
        "expected": risk_control_min_evidence(args.target),
    }
    most = min(pool - 1, max(args.n) * 2)
    for _ in range(args.open_reps):
        perm = torch.randperm(pool, generator=gen)
        for method in METHODS:
            opens[method].append(
                first_open(method, record, agree, perm, starts[method], args.open_step, most, args)
            )
    first = {}
    for method in METHODS:
        got = sorted(v for v in opens[method] if v is not None)
        first[method] = {
            "least_possible": starts[method],
            "median": got[len(got) // 2] if got else None,
            "min": got[0] if got else None,
            "max": got[-1] if got else None,
            "never_within": sum(v is None for v in opens[method]),
            "searched_up_to": most,
            "values": opens[method],
        }
    return {"by_n": out, "first_open_calibration_size": first}


def table(result: dict, learners: list[dict], args) -> str:
    eps = 1.0 - args.target
    lines = [
        f"target {args.target}, confidence {args.confidence}: CRC promises mean disagreement "
        f"(all answers) <= {eps:.4f}; LTT promises violation share (viol: early agreement < "
        f"target) <= {1 - args.confidence:.3f}; d>eps: share of calibrations serving more than "
        f"{eps:.4f} disagreement",
        f"{'n':>5} {'method':>16} {'open':>5} {'disagree(all) mean+-2se':>24} "
        f"{'viol':>6} {'d>eps':>6} {'agree(early)':>12} {'exit':>6} {'MACsave':>8}",
    ]
    for n, methods in result["by_n"].items():
        for method, r in methods.items():
            d = r["disagreement_all"]
            a = r["agreement_early"]["mean"]
            lines.append(
                f"{n:>5} {method:>16} {r['open_share']:>5.2f} "
                f"{d['mean']:>12.5f} +- {2 * d['se']:.5f}     "
                f"{r['violation_share']:>6.3f} {r['disagreement_all_above_bound_share']:>6.3f} "
                f"{a if a is not None else math.nan:>12.5f} "
                f"{r['exit_rate']['mean']:>6.3f} {r['mac_saving']['mean']:>8.4f}"
            )
    lines.append("calibration-set size at which a gate first opens (prefixes of a random draw):")
    for method, f in result["first_open_calibration_size"].items():
        lines.append(
            f"  {method:>16}: least possible {f['least_possible']}, median {f['median']}, "
            f"min {f['min']}, max {f['max']}, never within {f['searched_up_to']}: "
            f"{f['never_within']}/{len(f['values'])}"
        )
    lines.append("online learner on the traffic, samples served when a gate first opened:")
    for r in learners:
        lines.append(
            f"  {r['guarantee']:>16}: first_open_sample {r['first_open_sample']}, MAC saving "
            f"over the stream {r['mac_saving_total']:.4f} ({r['seconds']:.0f} s)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="digits")
    parser.add_argument("--traffic", type=int, default=4000, help="samples the learners stream")
    parser.add_argument("--pool", type=int, default=6000, help="held-out samples scored once")
    parser.add_argument("--n", type=int, nargs="+", default=[200, 500, 1000, 2000])
    parser.add_argument("--reps", type=int, default=200, help="calibrations per n")
    parser.add_argument("--open-reps", type=int, default=100)
    parser.add_argument("--open-step", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "guarantees.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    w = load_workload(args.workload, traffic_size=args.traffic, eval_size=args.pool, seed=0)
    learners, eem = [], None
    for guarantee in METHODS:
        model, figures = learn(w, guarantee, args)
        learners.append(figures)
        eem = eem or model
        print(f"learner {guarantee}: {figures}", flush=True)
    record = record_stream(eem, w.evaluation, batch_size=64)
    agree = record.preds == record.final_pred[:, None]
    t_sim = time.perf_counter()
    result = simulate(record, agree, args)
    report = {
        "workload": args.workload,
        "description": w.description,
        "target_agreement": args.target,
        "confidence": args.confidence,
        "pool": record.num_samples,
        "reps": args.reps,
        "learners": learners,
        "pool_full_agreement_of_best_exit": [
            float(agree[:, e].float().mean()) for e in range(record.num_exits)
        ],
        **result,
        "simulation_seconds": time.perf_counter() - t_sim,
        "seconds": time.perf_counter() - t0,
    }
    print(table(result, learners, args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
    print(f"saved {args.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
