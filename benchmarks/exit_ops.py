"""Operators and time a batch-1 call spends in the exits: a machine-independent count next to a
(noisy) timing, for comparing versions of the hooks, heads and gates.

On a reference workload's model (conv heads, a fitted learned gate with look-back), one image is
served under a few exit policies; for each, the ATen operators dispatched by one
``eem.predict(x)`` are counted (``TorchDispatchMode``: deterministic, whatever the machine's
load) and the call is timed against the base model in one interleaved loop (medians).

Policies: ``closed`` (no head runs); ``leave@i`` (every exit open, the image leaves at exit
``i``); ``stay`` (every exit open, nobody leaves); ``last-only`` (only the last exit open, exits
1-2 switched off: with a look-back gate that reads every head, all four heads run; a gate that
reads only the exits left on, as the calibrator now serves it, runs two).

Prints a table and writes ``benchmarks/results/exit_ops_<workload>.json``.

Usage:
    python benchmarks/exit_ops.py --workload fashion --threads 1   # ~1-2 min
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
import earlyexit as ee
from earlyexit.evaluation.workloads import load_workload
from earlyexit.gates import LearnedGate

RESULTS = Path(__file__).resolve().parent / "results"


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def policies(eem: ee.EarlyExitModel, gate: LearnedGate) -> dict[str, tuple[list[float], object]]:
    e = eem.num_exits
    lenient, strict = -math.inf, math.inf
    out = {"closed": ([strict] * e, gate)}
    for i in range(e):
        out[f"leave@{i}"] = ([strict] * i + [lenient] + [strict] * (e - i - 1), gate)
    out["stay"] = ([1e30] * e, gate)  # open, nobody confident enough
    reads_on = [True, False, False, True]
    served = gate.reading(reads_on) if hasattr(gate, "reading") else gate
    out["last-only"] = ([strict] * (e - 1) + [lenient], served)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="fashion")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--label", default="", help="a name for this version in the JSON")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = load_workload(args.workload, traffic_size=1, eval_size=1)
    first = w.traffic[0]
    x = (first[0] if isinstance(first, tuple) else first).unsqueeze(0)
    model = w.model.eval()
    torch.manual_seed(0)
    eem = ee.wrap(model, head="conv", input_size=tuple(x.shape[1:]))
    g = torch.Generator().manual_seed(0)
    gate = LearnedGate(
        torch.randn(eem.num_exits, 7, generator=g).tolist(),
        torch.randn(eem.num_exits, generator=g).tolist(),
    )
    rows = {}
    with torch.no_grad():
        for name, (thresholds, served) in policies(eem, gate).items():
            eem.gate = served
            eem.set_thresholds(thresholds)
            with CountOps() as counter:
                eem.predict(x)
            base_t, wrapped_t = [], []
            for r in range(args.reps + 3):
                start = time.perf_counter()
                model(x)
                mid = time.perf_counter()
                eem.predict(x)
                end = time.perf_counter()
                if r >= 3:
                    base_t.append(mid - start)
                    wrapped_t.append(end - mid)
            with CountOps() as plain:
                model(x)
            rows[name] = {
                "ops": sum(counter.ops.values()),
                "base_ops": sum(plain.ops.values()),
                "ratio": statistics.median(w_ / b for w_, b in zip(wrapped_t, base_t, strict=True)),
                "base_ms": 1e3 * statistics.median(base_t),
            }
            print(
                f"{args.label:8s} {name:10s} ops {rows[name]['ops']:5d} (base {rows[name]['base_ops']}) "
                f"time ratio {rows[name]['ratio']:.3f} (base {rows[name]['base_ms']:.2f} ms)",
                flush=True,
            )
    out = args.out or RESULTS / f"exit_ops_{args.workload}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"label": args.label, "threads": args.threads, "reps": args.reps, "device": "cpu"}
    out.write_text(json.dumps({"meta": meta, "policies": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
