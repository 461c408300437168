"""``earlyexit profile MODEL``: where the exits go and what each costs, in MACs."""

from __future__ import annotations

import argparse

from .common import (
    EXIT_OK,
    add_model_arguments,
    add_output_arguments,
    build_model,
    emit_json,
    exit_codes_text,
    status,
    table,
)

NAME = "profile"
HELP = "exits, MACs per exit and head overhead of a wrapped model"
DESCRIPTION = (
    "Wrap MODEL (random weights unless --weights) and print, per exit: the module it sits on, the "
    "backbone MACs up to it, its head's MACs, the MACs of a sample leaving there (every head on "
    "the way included) and that as a share of the base model. MACs follow torchvision's published "
    "convention (one multiply-add = one MAC; attention included; norms and activations free)."
)
EPILOG = f"""examples:
  earlyexit profile timm:resnet50
  earlyexit profile torchvision:vit_b_16 --exits 2,5,8 --head mlp
  earlyexit profile timm:resnet18 --input-size 64 --num-classes 10 --weights ckpt.pth
  earlyexit profile timm:resnet50 --fvcore --json > profile.json

exit codes:
{exit_codes_text()}"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--fvcore",
        action="store_true",
        help="also count with fvcore's per-module totals and show the largest difference "
        "(a cross-check; slower)",
    )
    parser.add_argument(
        "--candidates", action="store_true", help="also list every candidate exit module"
    )
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.breakdown import mac_breakdown
    from .common import wrap_model

    quiet = args.json
    model, label = build_model(args.model, num_classes=args.num_classes, weights=args.weights)
    if not quiet:
        status(f"wrapping {label} ...")
    eem = wrap_model(model, args)
    table_d = mac_breakdown(eem, method="dispatch")
    table_f = mac_breakdown(eem, method="fvcore") if args.fvcore else None
    payload = {
        "model": label,
        "family": eem.family,
        "input_size": list(eem.input_size),
        "num_classes": eem.num_classes,
        "head": eem.head_kind,  # "mixed" when the exits' kinds differ
        "head_kinds": list(eem.head_kinds),
        "base_macs": table_d.base_macs,
        "head_overhead": table_d.head_overhead,
        "exits": [
            {
                "index": i,
                "name": row.name,
                "head": eem.head_kinds[i],
                "candidate_index": eem.exits[i].index,
                "backbone_macs": row.backbone_macs,
                "head_macs": row.head_macs,
                "cumulative_macs": row.cumulative_macs,
                "fraction_of_base": row.fraction,
            }
            for i, row in enumerate(table_d.rows[:-1])
        ],
        "final": {
            "backbone_macs": table_d.rows[-1].backbone_macs,
            "cumulative_macs": table_d.rows[-1].cumulative_macs,
            "fraction_of_base": table_d.rows[-1].fraction,
        },
        "unsupported_ops": table_d.unsupported_ops,
    }
    if args.candidates:
        payload["candidates"] = list(eem.candidates)
    if table_f is not None:
        diffs = [
            abs(a.cumulative_macs - b.cumulative_macs) / max(b.cumulative_macs, 1)
            for a, b in zip(table_d.rows, table_f.rows, strict=True)
        ]
        payload["fvcore"] = {
            "base_macs": table_f.base_macs,
            "cumulative_macs": [r.cumulative_macs for r in table_f.rows],
            "max_relative_difference": max(diffs),
            "unsupported_ops": table_f.unsupported_ops,
        }
    if args.json:
        emit_json(payload)
        return EXIT_OK
    rows = [
        [
            i,
            row.name,
            f"{row.backbone_macs / 1e9:.3f}",
            f"{row.head_macs / 1e6:.3f}",
            f"{row.cumulative_macs / 1e9:.3f}",
            f"{100 * row.fraction:.1f}%",
        ]
        for i, row in enumerate(table_d.rows[:-1])
    ]
    last = table_d.rows[-1]
    rows.append(
        ["final", "(base model + all heads)", f"{last.backbone_macs / 1e9:.3f}", "", f"{last.cumulative_macs / 1e9:.3f}", f"{100 * last.fraction:.1f}%"]
    )  # fmt: skip
    # Mixed kinds: each exit's, in exit order (linear/conv/conv/mlp heads).
    kinds = "/".join(eem.head_kinds) if len(set(eem.head_kinds)) > 1 else eem.head_kind
    print(
        f"{label}  ({eem.family}, input {tuple(eem.input_size)}, {eem.num_classes} classes, {kinds} heads)"
    )
    print(f"base model: {table_d.base_macs / 1e9:.3f} GMACs per sample")
    print(
        table(
            rows,
            ["exit", "module", "backbone GMACs", "head MMACs", "leaving here GMACs", "of base"],
        )
    )
    print(f"head overhead: all heads together {100 * table_d.head_overhead:.3f}% of the base model")
    if table_d.unsupported_ops:
        print(f"not counted (unsupported operators): {table_d.unsupported_ops}")
    if table_f is not None:
        f = payload["fvcore"]
        print(
            f"fvcore cross-check: base {table_f.base_macs / 1e9:.3f} GMACs, largest difference {100 * f['max_relative_difference']:.3f}%"
        )
        if table_f.unsupported_ops:
            print(f"fvcore could not count: {table_f.unsupported_ops}")
    if args.candidates:
        print("candidate exits: " + ", ".join(f"{i}:{n}" for i, n in enumerate(eem.candidates)))
    return EXIT_OK
