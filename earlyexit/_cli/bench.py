"""``earlyexit bench MODEL``: wall-clock of the wrapped model at forced exit mixes, as ratios."""

from __future__ import annotations

import argparse

from .common import (
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    add_model_arguments,
    add_output_arguments,
    build_model,
    emit_json,
    exit_codes_text,
    parse_int_list,
    positive_int,
    status,
    table,
)

NAME = "bench"
HELP = "latency and throughput of a wrapped model vs the model itself, at several exit mixes"
DESCRIPTION = (
    "Wrap MODEL and time it against the unwrapped model in the same loop (repetitions "
    "interleaved, warm-up excluded, CPU threads fixed), with forced exit mixes: 'closed' (gates "
    "closed: the hooks' overhead), 'all@i' (every sample leaves at exit i), 'half@0' (half leave "
    "at exit 0, half run to the end: the cost of shrinking a batch) and 'even' (an even spread). "
    "Each row gives time ratios wrapped / base and what the MAC fraction of the mix predicts."
)
EPILOG = f"""examples:
  earlyexit bench timm:resnet50
  earlyexit bench timm:vit_base_patch16_224 --batch-sizes 1,32 --reps 20 --reps-batched 3
  earlyexit bench timm:resnet18 --input-size 64 --mixes closed,all@0 --json > bench.json

reading the output: 'time ratio' is the median over repetitions of wrapped / base time within
the same repetition (robust to drifting load); ratio < 1 is faster than the base model; 'overhead' = measured ratio minus
the mix's MAC fraction (what shrinking, hooks and heads cost beyond the MACs). Timings on a
shared machine are noisy: compare ratios from one run, not seconds across runs.

exit codes:
{exit_codes_text()}"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--batch-sizes", type=parse_int_list, default=[1, 32], metavar="LIST", help="default 1,32"
    )
    parser.add_argument(
        "--mixes",
        default=None,
        metavar="LIST",
        help="comma-separated subset of: closed, all@I, half@0, even (default: all of them)",
    )
    parser.add_argument(
        "--reps",
        type=positive_int,
        default=15,
        metavar="N",
        help="timed reps at batch 1 (default 15)",
    )
    parser.add_argument(
        "--reps-batched",
        type=positive_int,
        default=3,
        metavar="N",
        help="timed reps at larger batches (default 3)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, metavar="N", help="untimed calls per config (default 1)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="CPU threads (default: torch's)",
    )
    add_output_arguments(parser, progress=True)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.latency import bench_exit_mixes, default_mixes

    model, label = build_model(args.model, num_classes=args.num_classes, weights=args.weights)
    status(f"wrapping {label} ...", args)
    probe = _wrap_probe(model, args)
    mixes = default_mixes(probe.num_exits)
    probe.remove()
    if args.mixes:
        wanted = [m.strip() for m in args.mixes.split(",") if m.strip()]
        known = {m.name: m for m in mixes}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise CliError(
                f"unknown mix {', '.join(unknown)}; choose from {', '.join(known)}", EXIT_USAGE
            )
        mixes = [known[w] for w in wanted]
    reps = {b: (args.reps if b == 1 else args.reps_batched) for b in args.batch_sizes}
    status(f"timing {len(mixes)} mixes at batch sizes {args.batch_sizes} ...", args)
    rows, eem = bench_exit_mixes(
        model,
        input_size=args.input_size,
        batch_sizes=args.batch_sizes,
        mixes=mixes,
        reps=reps,
        warmup=args.warmup,
        threads=args.threads,
        exits=args.exits,
        head=args.head,
        num_exits=args.num_exits,
        progress=not args.no_progress,
    )
    import torch

    payload = {
        "model": label,
        "input_size": list(eem.input_size),
        "exits": [p.name for p in eem.exits],
        "threads": args.threads or torch.get_num_threads(),
        "device": "cpu",
        "rows": [r.to_dict() for r in rows],
    }
    eem.remove()
    if args.json:
        emit_json(payload)
        return EXIT_OK
    print(f"{label}: exits at {', '.join(payload['exits'])}; {payload['threads']} CPU threads")
    print(
        table(
            [
                [
                    r.batch,
                    r.mix,
                    f"{r.mac_fraction:.3f}",
                    f"{r.ratio_paired:.3f}",
                    f"{r.ratio_median:.3f}",
                    f"{r.ratio_p90:.3f}",
                    f"{r.ratio_min:.3f}",
                    f"{r.overhead_vs_macs:+.3f}",
                    f"{r.throughput_ratio:.2f}",
                    f"{1000 * r.base_median_s:.1f}",
                ]
                for r in rows
            ],
            [
                "batch",
                "mix",
                "MAC frac",
                "time ratio",
                "of medians",
                "p90 ratio",
                "min ratio",
                "overhead",
                "thru x",
                "base ms",
            ],
        )
    )
    return EXIT_OK


def _wrap_probe(model, args):  # the default mixes depend on the number of exits
    from .common import wrap_model

    return wrap_model(model, args, validate=False)
