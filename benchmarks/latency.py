"""Wall-clock cost of early exit on timm resnet50 and vit_base_patch16_224 (random weights, CPU or GPU).

For each model, the wrapped model is timed against the model itself in one interleaved loop
(warm-up excluded, CPU threads fixed) at batch 1 and batch 32, with forced exit mixes:

* ``closed``: every gate closed (hooks installed, no head runs): the wrapping overhead.
  Target: <= 3% over the base model.
* ``all@i``: every sample leaves at exit ``i``. Target for ``all@0``: time ratio <= the MAC
  fraction of exit 0 + 0.10.
* ``half@0``, ``even`` (batch 32 only): a batch that shrinks on the way; compare the measured
  ratio with the MAC fraction to see what shrinking costs (several smaller kernels).

Timings on a shared machine are noisy: read the ratios (median, and min, the steadiest under
contention), never absolute seconds across runs. Prints a table and writes
``benchmarks/results/latency.json`` (``latency_quick.json`` with ``--quick``).

On a GPU (``--device cuda``) calls are timed with CUDA events, more repetitions are taken (each
call is milliseconds), cuDNN autotuning is on (as a server with fixed input sizes would run) and
the results go to ``latency_cuda.json``.

``--workload fashion`` (or ``digits``, ``photos``) times a reference workload's trained model at its
own input size instead (``--head conv`` as the demo serves it), where heads and gates weigh most:
a small, dispatch-bound backbone at batch 1.

Usage:
    python benchmarks/latency.py                  # ~5 minutes on 2 idle CPU cores (more when shared)
    python benchmarks/latency.py --workload fashion --head conv --quick --threads 1
    python benchmarks/latency.py --quick          # ~1-2 minutes: batch 8 instead of 32, fewer reps
    python benchmarks/latency.py --device cuda    # ~1 minute on one GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from earlyexit.evaluation.latency import bench_exit_mixes, default_mixes

MODELS = ("resnet50", "vit_base_patch16_224")
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 8 and fewer reps (~1 min)")
    parser.add_argument("--models", default=",".join(MODELS), help="timm names, comma-separated")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--workload", default=None, help="time a reference workload's model instead of --models"
    )
    parser.add_argument("--head", default="linear", help="exit head kind (default linear)")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (CUDA events time each call on a GPU)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if (
        device.type == "cuda"
    ):  # fixed input sizes, as in serving: let cuDNN pick its fastest kernels
        torch.backends.cudnn.benchmark = True

    big = 8 if args.quick else 32
    reps = {1: 5 if args.quick else 10, big: 2}
    if device.type == "cuda":  # milliseconds per call: many more repetitions for stable medians
        reps = {b: 20 * r for b, r in reps.items()}
    stem = (
        "latency"
        + (f"_{args.workload}_{args.head}" if args.workload else "")
        + ("_quick" if args.quick else "")
        + ("_cuda" if device.type == "cuda" else "")
    )
    out = args.out or RESULTS / f"{stem}.json"
    results = {
        "description": "wrapped / base wall-clock ratios, random weights, interleaved reps, on "
        + (torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"),
        "device": str(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": args.threads,
        "batch_sizes": [1, big],
        "reps": {str(k): v for k, v in reps.items()},
        "models": {},
    }
    started = time.perf_counter()
    names = [args.workload] if args.workload else args.models.split(",")
    for name in names:
        torch.manual_seed(0)
        input_size = None
        if args.workload:
            from earlyexit.evaluation.workloads import load_workload

            workload = load_workload(args.workload, traffic_size=1, eval_size=1)
            model = workload.model.eval().to(device)
            first = workload.traffic[0]
            input_size = tuple((first[0] if isinstance(first, tuple) else first).shape)
        else:
            model = timm.create_model(name, pretrained=False).eval().to(device)
        print(f"== {name} ==", file=sys.stderr, flush=True)
        mixes = default_mixes(4)
        keep_b1 = [m for m in mixes if m.pure]
        keep_big = [m for m in mixes if m.name in ("closed", "all@0", "all@2", "half@0", "even")]
        rows = []
        for batch, chosen in ((1, keep_b1), (big, keep_big)):
            part, eem = bench_exit_mixes(
                model,
                batch_sizes=[batch],
                mixes=chosen,
                reps=reps,
                warmup=10 if device.type == "cuda" else 1,
                threads=args.threads,
                progress=not args.no_progress,
                input_size=input_size,
                head=args.head,
            )
            exits = [p.name for p in eem.exits]
            fractions = [p.macs / eem.base_macs for p in eem.exits]
            eem.remove()
            rows.extend(part)
        by = {(r.batch, r.mix): r for r in rows}
        checks = {}
        for b in (1, big):
            closed, first = by[(b, "closed")], by[(b, "all@0")]
            checks[f"b{b}"] = {
                "closed_ratio": closed.ratio_paired,
                "closed_ratio_min": closed.ratio_min,
                "closed_within_3pct": closed.ratio_paired <= 1.03,
                "first_exit_ratio": first.ratio_paired,
                "first_exit_ratio_min": first.ratio_min,
                "first_exit_mac_fraction": first.mac_fraction,
                "first_exit_prefix_ratio": first.prefix_ratio,
                "first_exit_within_fraction_plus_10pct": first.ratio_paired
                <= first.mac_fraction + 0.10,
            }
        results["models"][name] = {
            "exits": exits,
            "exit_mac_fractions": fractions,
            "rows": [r.to_dict() for r in rows],
            "wrapping_checks": checks,
        }
        _print_model(name, exits, fractions, rows, checks)
    results["elapsed_s"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out} ({results['elapsed_s']:.0f} s)")
    return 0


def _f(v: float | None, spec: str = ".3f") -> str:
    return "" if v is None else format(v, spec)


def _print_model(name, exits, fractions, rows, checks) -> None:
    print(
        f"\n{name}: exits {', '.join(f'{e} ({100 * f:.1f}%)' for e, f in zip(exits, fractions, strict=True))}"
    )
    print(
        "| batch | mix | MAC fraction | time ratio (paired median) | ratio of medians | min "
        "| backbone alone to the exit | overhead vs MACs | overhead vs backbone alone | throughput x |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.batch} | {r.mix} | {r.mac_fraction:.3f} | {r.ratio_paired:.3f} "
            f"| {r.ratio_median:.3f} | {r.ratio_min:.3f} | {_f(r.prefix_ratio)} "
            f"| {r.ratio_paired - r.mac_fraction:+.3f} "
            f"| {_f(None if r.prefix_ratio is None else r.ratio_paired - r.prefix_ratio, '+.3f')} "
            f"| {1 / r.ratio_paired:.2f} |"
        )
    for b, c in checks.items():
        print(
            f"{b}: gates closed {c['closed_ratio']:.3f} (min {c['closed_ratio_min']:.3f}; target <= 1.03: "
            f"{'ok' if c['closed_within_3pct'] else 'MISSED'}); all at first exit "
            f"{c['first_exit_ratio']:.3f} (min {c['first_exit_ratio_min']:.3f}) vs MAC fraction "
            f"{c['first_exit_mac_fraction']:.3f} + 0.10: {'ok' if c['first_exit_within_fraction_plus_10pct'] else 'MISSED'}"
            f" (backbone alone up to exit 0: {_f(c['first_exit_prefix_ratio'])})"
        )


if __name__ == "__main__":
    sys.exit(main())
