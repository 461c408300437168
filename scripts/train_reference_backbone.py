"""Train the reference backbone of the "digits" or a "textures" workload and record how it was made.

Trains timm ``regnety_002`` (10 classes, 3x64x64 input) on the train split of the digits workload
with fixed seeds (on harder renders than it serves, see ``DIGITS_TRAIN_DIFFICULTY``),
measures top-1 accuracy on the evaluation split (fp32 and after the fp16 storage
round trip), and writes, next to ``earlyexit/evaluation/workloads/__init__.py``:

- ``digits_regnety_002.safetensors``: the weights, fp16;
- ``digits_regnety_002.json``: recipe, accuracy, file size and sha256, library versions.

With ``--workload textures_resnet`` or ``--workload textures_vit`` it trains that backbone instead
(see ``earlyexit/evaluation/workloads/_textures.py``) on ``--samples`` fresh renders of the textures
train split, and writes ``textures_resnet18_half.*`` or ``textures_vit_tiny.*`` with the accuracy on
2000 evaluation and 2000 traffic samples (seed 0), also per difficulty bin.

Usage (from the repository root)::

    python scripts/train_reference_backbone.py               # the shipped digits recipe
    python scripts/train_reference_backbone.py --renders-per-source 4 --out-dir /tmp/bb  # quick
    # the shipped textures backbones: three rounds, each continuing from the one before
    python scripts/train_reference_backbone.py --workload textures_resnet --samples 36000 \
        --out-dir /tmp/round1
    python scripts/train_reference_backbone.py --workload textures_resnet --samples 40000 \
        --lr 1e-3 --seed 1 --init /tmp/round1 --out-dir /tmp/round2
    python scripts/train_reference_backbone.py --workload textures_resnet --samples 40000 \
        --lr 5e-4 --seed 2 --init /tmp/round2
    # textures_vit: the same with --samples 32000, 36000, 36000
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from earlyexit.evaluation.workloads import DIGITS_EVAL_SIZE, DIGITS_TRAFFIC_SIZE
from earlyexit.evaluation.workloads._digits import (
    DIGITS_CHECKPOINT,
    DIGITS_TRAIN_DIFFICULTY,
    DigitImages,
    evaluate_accuracy,
    load_digits_backbone,
    save_digits_backbone,
    train_digits_backbone,
)
from earlyexit.evaluation.workloads._fp16 import checkpoint_record
from earlyexit.evaluation.workloads._textures import (
    TEXTURE_MODELS,
    TextureViews,
    load_texture_backbone,
    save_texture_backbone,
    train_texture_backbone,
)


def train_textures(args: argparse.Namespace) -> int:
    """Train (or with ``--evaluate``, re-measure), then record one textures backbone."""
    spec = TEXTURE_MODELS[args.workload]
    checkpoint = args.out_dir / spec.checkpoint.name
    evaluation = TextureViews("evaluation", size=TEXTURE_EVAL_SIZE, seed=0, side=spec.side)
    traffic = TextureViews("traffic", size=TEXTURE_EVAL_SIZE, seed=0, side=spec.side)
    if args.evaluate is None:
        init = None if args.init is None else args.init / spec.checkpoint.name
        model, recipe = train_texture_backbone(
            args.workload, samples=args.samples, lr=args.lr, seed=args.seed, init=init
        )
        if args.init is not None:  # a second round: keep the first round's recipe with it
            previous = json.loads(init.with_suffix(".json").read_text())
            recipe["init_recipe"] = previous["recipe"]
            recipe["init_accuracy"] = previous["accuracy"]
        acc_fp32: float | None = round(evaluate_accuracy(model, evaluation), 4)
        save_texture_backbone(args.workload, model, checkpoint)
    else:
        source = args.evaluate / spec.checkpoint.name
        previous = json.loads(source.with_suffix(".json").read_text())
        recipe, acc_fp32 = previous["recipe"], previous["accuracy_fp32_before_storage"]
        if source.resolve() != checkpoint.resolve():
            shutil.copyfile(source, checkpoint)
    stored = load_texture_backbone(args.workload, checkpoint)  # fp16 storage, fp32 compute
    # the figure the fast test reproduces: correct answers on the first evaluation samples
    subset = torch.utils.data.Subset(evaluation, range(TEXTURE_SUBSET_SIZE))
    subset_correct = round(evaluate_accuracy(stored, subset) * TEXTURE_SUBSET_SIZE)
    record = {
        "workload": args.workload,
        "recipe": recipe,
        "parameters": sum(p.numel() for p in stored.parameters()),
        "evaluation": {
            "split": "evaluation",
            "size": len(evaluation),
            "seed": 0,
            "difficulty_beta": list(evaluation.difficulty),
        },
        "accuracy": round(evaluate_accuracy(stored, evaluation), 4),
        "accuracy_fp32_before_storage": acc_fp32,
        "accuracy_traffic": round(evaluate_accuracy(stored, traffic), 4),
        "subset": {
            "split": "evaluation",
            "seed": 0,
            "first": TEXTURE_SUBSET_SIZE,
            "correct": subset_correct,
        },
        "accuracy_by_difficulty": accuracy_by_difficulty(stored, evaluation),
        "checkpoint": checkpoint_record(checkpoint),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": __import__("timm").__version__,
            "numpy": np.__version__,
            "scipy": __import__("scipy").__version__,
            "scikit-image": __import__("skimage").__version__,
            "pillow": __import__("PIL").__version__,
        },
    }
    checkpoint.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


TEXTURE_EVAL_SIZE = 2000  # evaluation and traffic samples measured for a textures record
TEXTURE_SUBSET_SIZE = 200  # the first evaluation samples, whose score the fast test checks


@torch.inference_mode()
def accuracy_by_difficulty(
    model: torch.nn.Module, data: DigitImages | TextureViews
) -> dict[str, float]:
    """Accuracy in difficulty bins: shows that the hard tail is where the errors are."""
    difficulty = np.array([data.describe(i)["difficulty"] for i in range(len(data))])
    loader = torch.utils.data.DataLoader(data, batch_size=256)
    hits = torch.cat([model(x).argmax(-1) == y for x, y in loader]).numpy()
    edges = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    out = {}
    for lo, hi in itertools.pairwise(edges):
        sel = (difficulty >= lo) & (difficulty < hi)
        if sel.any():
            out[f"{lo:.1f}-{hi:.1f} (n={int(sel.sum())})"] = round(float(hits[sel].mean()), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workload",
        choices=("digits", *TEXTURE_MODELS),
        default="digits",
        help="which reference backbone to train (default digits)",
    )
    parser.add_argument("--renders-per-source", type=int, default=96, help="digits only")
    parser.add_argument(
        "--samples", type=int, default=64_000, help="textures only: training renders"
    )
    parser.add_argument("--lr", type=float, default=2e-3, help="textures only: peak learning rate")
    parser.add_argument(
        "--init",
        type=Path,
        metavar="DIR",
        help="textures only: continue from the checkpoint + record in DIR (a second round)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (recorded)")
    parser.add_argument("--out-dir", type=Path, default=DIGITS_CHECKPOINT.parent)
    parser.add_argument(
        "--evaluate",
        type=Path,
        metavar="DIR",
        help="skip training: re-measure the checkpoint + record in DIR (after a change to the"
        " evaluation stream) and write them to --out-dir",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.workload != "digits":
        return train_textures(args)
    checkpoint = args.out_dir / DIGITS_CHECKPOINT.name
    evaluation = DigitImages("evaluation", size=DIGITS_EVAL_SIZE, seed=0)
    traffic = DigitImages("traffic", size=DIGITS_TRAFFIC_SIZE, seed=0)
    acc_fp32: float | None = None
    if args.evaluate is None:
        model, recipe = train_digits_backbone(
            renders_per_source=args.renders_per_source, seed=args.seed
        )
        acc_fp32 = evaluate_accuracy(model, evaluation)
        save_digits_backbone(model, checkpoint)
    else:
        source = args.evaluate / DIGITS_CHECKPOINT.name
        recipe = json.loads(source.with_suffix(".json").read_text())["recipe"]
        recipe.setdefault("train_difficulty_beta", list(DIGITS_TRAIN_DIFFICULTY))
        if source.resolve() != checkpoint.resolve():
            shutil.copyfile(source, checkpoint)
    stored = load_digits_backbone(checkpoint)  # what users get: fp16 storage, fp32 compute
    record = {
        "workload": "digits",
        "recipe": recipe,
        "evaluation": {
            "split": "evaluation",
            "size": len(evaluation),
            "seed": 0,
            "difficulty_beta": list(evaluation.difficulty),
        },
        "accuracy": round(evaluate_accuracy(stored, evaluation), 4),
        "accuracy_fp32_before_storage": None if acc_fp32 is None else round(acc_fp32, 4),
        "accuracy_traffic": round(evaluate_accuracy(stored, traffic), 4),
        "accuracy_by_difficulty": accuracy_by_difficulty(stored, evaluation),
        "checkpoint": checkpoint_record(checkpoint),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": __import__("timm").__version__,
            "numpy": np.__version__,
            "scipy": __import__("scipy").__version__,
            "scikit-learn": __import__("sklearn").__version__,
        },
    }
    checkpoint.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
