"""``earlyexit run``: the demo's path on your own model and a folder of images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (
    EXIT_BAD_INPUT,
    EXIT_MISSING_FILE,
    EXIT_OK,
    CliError,
    add_model_source_arguments,
    add_output_arguments,
    build_model,
    emit_json,
    exit_codes_text,
    parse_input_size,
    status,
)
from .serving import _unit_interval, add_serving_arguments, options_from_args, print_outcome

NAME = "run"
HELP = "learn exits online on your model and a folder of images, and report what they save"
DESCRIPTION = (
    "Builds MODEL (timm:NAME or torchvision:NAME) with --weights PATH (a local checkpoint) or "
    "--pretrained (downloads, for machines with a network), reads --data DIR through the model's "
    "own preprocessing (timm data config / torchvision weights transforms), streams a shuffled "
    "share of the images through OnlineDistiller.step while learning, and evaluates on the rest "
    "exactly as `earlyexit demo` does. --data is a labelled ImageFolder (one sub-folder per "
    "class: integer folder names are the model's class indices, other names are numbered in "
    "sorted order) or a flat folder of unlabelled images. Unreadable images are skipped and "
    "counted. --save writes the learned heads and thresholds (load them with earlyexit.load)."
)
EPILOG = f"""examples:
  earlyexit run --model timm:resnet50 --weights resnet50.pth --data photos/ --save heads.safetensors
  earlyexit run --model torchvision:resnet18 --pretrained --data val/ --target-agreement 0.98
  earlyexit run --model timm:resnet18 --num-classes 10 --weights mine.pth --data imgs/ --json

exit codes:
{exit_codes_text()}"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source_arguments(parser)
    parser.add_argument(
        "--data", required=True, metavar="DIR", help="folder of images (ImageFolder or flat)"
    )
    parser.add_argument(
        "--eval-fraction",
        type=_unit_interval,
        default=0.2,
        metavar="F",
        help="share of the images held out for evaluation (default 0.2)",
    )
    prep = parser.add_argument_group(
        "preprocessing overrides",
        "defaults come from the model (timm data config / torchvision weights)",
    )
    prep.add_argument("--input-size", type=parse_input_size, metavar="SIZE", help="H, HxW or CxHxW")
    prep.add_argument(
        "--mean", type=_floats, metavar="M,M,M", help="normalisation mean per channel"
    )
    prep.add_argument("--std", type=_floats, metavar="S,S,S", help="normalisation std per channel")
    prep.add_argument(
        "--crop-pct", type=float, metavar="F", help="centre-crop share (1.0: no crop)"
    )
    parser.add_argument(
        "--save", metavar="PATH", help="write the learned heads + thresholds here (.safetensors)"
    )
    parser.add_argument(
        "--out",
        default="earlyexit-run",
        metavar="DIR",
        help="report directory (default earlyexit-run/)",
    )
    add_serving_arguments(parser)
    add_output_arguments(parser, progress=True)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected 1 or 3 numbers, got {text!r}")
    return values * 3 if len(values) == 1 else values


def run(args: argparse.Namespace) -> int:
    from .._optional import require_demo_packages
    from ..data import model_transform, scan_folder, split_stream
    from ..errors import InputError
    from ..evaluation.pipeline import serve_and_evaluate

    data = Path(args.data)
    if data.is_file():
        raise CliError(
            f"--data takes a folder of images, but {data} is a file: put the images in a folder "
            "(one sub-folder per class when they are labelled)",
            EXIT_BAD_INPUT,
        )
    if not data.is_dir():
        raise CliError(f"data folder not found: {data}", EXIT_MISSING_FILE)
    # The report's PNG is drawn at the end: check for matplotlib before minutes of serving.
    require_demo_packages(["matplotlib"], "earlyexit run (the report's plot)")
    model, label = build_model(
        args.model, num_classes=args.num_classes, weights=args.weights, pretrained=args.pretrained
    )
    source, name = label.split(":", 1)
    try:
        scan = scan_folder(data)
        traffic, evaluation = split_stream(
            scan,
            model_transform(
                model,
                source,
                name,
                input_size=args.input_size,
                mean=args.mean,
                std=args.std,
                crop_pct=args.crop_pct,
            ),
            eval_fraction=args.eval_fraction,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        # Before minutes of serving: a split whose every file is broken is bad data, to be
        # reported by name (reading stops at the first image that reads).
        traffic.require_readable()
        evaluation.require_readable()
    except InputError as err:
        raise CliError(str(err), EXIT_BAD_INPUT) from None
    labelled = scan.labels is not None
    status(
        f"{len(scan.files)} images in {data} ({'labelled, ' + str(len(scan.classes)) + ' classes' if labelled else 'unlabelled'}): "
        f"{len(traffic)} traffic, {len(evaluation)} held out",
        args,
    )
    try:
        result = serve_and_evaluate(
            model,
            traffic,
            evaluation,
            labelled=labelled,
            out_dir=Path(args.out),
            name="run",
            model_name=label,
            stream_meta={"data": str(data), "traffic": len(traffic), "evaluation": len(evaluation)},
            options=options_from_args(args),
            input_size=args.input_size,
            log=lambda message: status(message, args),
        )
    except InputError as err:
        raise CliError(f"the images do not fit the model: {err}", EXIT_BAD_INPUT) from None
    skipped = traffic.skipped
    result.report["skipped_images"] = {"count": skipped.count, "files": skipped.files[:20]}
    result.paths["json"].write_text(json.dumps(result.report, indent=2, allow_nan=False) + "\n")
    if skipped.count:
        status(f"skipped {skipped.count} unreadable image(s), e.g. {skipped.files[0][0]}", args)
    if args.save:
        result.learner.eem.save(args.save)
        status(
            f"saved heads and thresholds to {args.save} (load with earlyexit.load(model, path))",
            args,
        )
    if args.json:
        emit_json(result.report)
    else:
        print_outcome(result)
        if skipped.count:
            print(f"skipped: {skipped.count} unreadable image(s)")
    return EXIT_OK
