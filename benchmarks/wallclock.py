"""Does the wall-clock saving track the MAC saving? The demo pipeline with heads priced in MACs
and in measured time, side by side, plus where batch-1 time goes per head and gate.

For each workload and seed, the demo pipeline (``earlyexit demo``'s defaults: conv heads, learned
gate, batch 32) runs twice on the same stream: exit selection pricing heads in MACs
(``DistillConfig(head_cost="macs")``, the default) and in measured time (``head_cost="time"``).
Each run reports its MAC saving, ``latency_ratio_b1`` and ``throughput_ratio`` (wrapped / base,
timed by the report in one interleaved loop), the time saving as a share of the MAC saving at
batch 1 (``(1 - latency_ratio_b1) / mac_saving``) and batched (``(1 - 1 / throughput_ratio) /
mac_saving``), which exits stayed on, and each head + gate's time at batch 1 and 32 as a share of
the base model's (:func:`earlyexit.head_timing.measure_head_time_fractions`).

Timings on a shared CPU are noisy: compare the two arms of one run, not absolute seconds.
Prints a table and writes ``benchmarks/results/wallclock_<workload>.json``.

Usage:
    python benchmarks/wallclock.py --workload fashion --seed 0 --threads 1   # ~5-10 min
    python benchmarks/wallclock.py --workload digits --seed 0 1 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from earlyexit.evaluation.pipeline import PipelineOptions, serve_and_evaluate
from earlyexit.evaluation.workloads import load_workload
from earlyexit.head_timing import measure_head_time_fractions

RESULTS = Path(__file__).resolve().parent / "results"


def run_arm(workload: str, seed: int, head_cost: str, threads: int) -> dict:
    w = load_workload(workload, seed=seed)
    options = PipelineOptions(
        seed=seed, threads=threads, progress=False, distill={"head_cost": head_cost}
    )
    with tempfile.TemporaryDirectory() as out:
        result = serve_and_evaluate(
            w.model,
            w.traffic,
            w.evaluation,
            labelled=w.labelled,
            out_dir=out,
            options=options,
            log=lambda message: None,
        )
    report, eem = result.report, result.learner.eem
    mac = float(report["mac_saving"])
    b1 = float(report["latency_ratio_b1"])
    thr = float(report["throughput_ratio"])
    stats = result.learner.stats()
    return {
        "workload": workload,
        "seed": seed,
        "head_cost": head_cost,
        "mac_saving": mac,
        "agreement": float(report["agreement"]),
        "latency_ratio_b1": b1,
        "throughput_ratio": thr,
        "time_over_mac_b1": (1.0 - b1) / mac if mac > 0 else None,
        "time_over_mac_batched": (1.0 - 1.0 / thr) / mac if mac > 0 else None,
        "thresholds": [float(t) for t in eem.thresholds],
        "exit_states": [str(e["state"]) for e in stats["exits"]],
        "gate": stats["gate"],
        "head_time_fractions_used": stats["head_time_fractions"],
        "head_time_share_b1": list(measure_head_time_fractions(eem, batch_size=1)),
        "head_time_share_b32": list(measure_head_time_fractions(eem, batch_size=32, reps=7)),
        "head_mac_share": [m / eem.base_macs for m in eem.head_macs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="fashion")
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seed:
        for head_cost in ("macs", "time"):
            row = run_arm(args.workload, seed, head_cost, args.threads)
            rows.append(row)
            print(
                f"{args.workload} seed {seed} head_cost={head_cost:5s} MAC saving "
                f"{row['mac_saving']:.1%} agreement {row['agreement']:.2%} | batch 1: ratio "
                f"{row['latency_ratio_b1']:.2f}x, time/MAC saving {row['time_over_mac_b1']:.2f} | "
                f"batched: throughput {row['throughput_ratio']:.2f}x, time/MAC saving "
                f"{row['time_over_mac_batched']:.2f} | exits {row['exit_states']}",
                flush=True,
            )
            print(
                "  head+gate time share b1 "
                + " ".join(f"{v:.3f}" for v in row["head_time_share_b1"])
                + " | b32 "
                + " ".join(f"{v:.3f}" for v in row["head_time_share_b32"])
                + " | MAC share "
                + " ".join(f"{v:.3f}" for v in row["head_mac_share"]),
                flush=True,
            )
    out = args.out or RESULTS / f"wallclock_{args.workload}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "torch": torch.__version__, "device": "cpu"}
    out.write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
