"""Exits chosen by ``exits="auto"`` and head cost, for one full-size model of every supported family.

Random weights (nothing is downloaded), CPU, the model's own input size. For each model: base MACs,
the auto-placed exits with the backbone MAC fraction at each, and the largest head's MACs as a
fraction of the base model's for each built-in head kind (the cap is 2%).

    python benchmarks/families.py            # all families, ~3 minutes on 2 cores
    python benchmarks/families.py --quick    # a few families
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import earlyexit as ee

warnings.filterwarnings("ignore")

MODELS = [
    ("timm", "resnet50"),
    ("timm", "resnet50d"),
    ("timm", "vit_base_patch16_224"),
    ("timm", "deit_small_distilled_patch16_224"),
    ("timm", "convnext_tiny"),
    ("timm", "efficientnet_b0"),
    ("timm", "mobilenetv3_large_100"),
    ("timm", "regnety_016"),
    ("timm", "swin_tiny_patch4_window7_224"),
    ("torchvision", "resnet50"),
    ("torchvision", "vit_b_16"),
    ("torchvision", "convnext_tiny"),
    ("torchvision", "efficientnet_b0"),
    ("torchvision", "mobilenet_v2"),
    ("torchvision", "mobilenet_v3_large"),
    ("torchvision", "swin_t"),
    ("torchvision", "densenet121"),
]
QUICK = {"resnet50", "vit_base_patch16_224", "mobilenet_v3_large"}


def build(source: str, name: str) -> torch.nn.Module:
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False).eval()
    import torchvision

    return torchvision.models.get_model(name, weights=None).eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="only a few families")
    parser.add_argument(
        "--out", default="benchmarks/results/families.json", help="where to save JSON"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for source, name in MODELS:
        if args.quick and name not in QUICK:
            continue
        start = time.perf_counter()
        model = build(source, name)
        eem = ee.wrap(model)
        wrap_s = time.perf_counter() - start
        head_fraction = {"linear": max(eem.head_macs) / eem.base_macs}
        for kind in ("mlp", "conv"):
            other = ee.wrap(model, exits=[e.name for e in eem.exits], head=kind, validate=False)
            head_fraction[kind] = max(other.head_macs) / other.base_macs
            other.remove()
        row = {
            "model": f"{source}:{name}",
            "family": eem.family,
            "base_gmacs": eem.base_macs / 1e9,
            "exits": [e.name for e in eem.exits],
            "exit_mac_fraction": [round(m / eem.base_macs, 3) for m in eem.backbone_macs],
            "max_head_fraction": head_fraction,
            "wrap_seconds": round(wrap_s, 2),
        }
        rows.append(row)
        print(
            f"{row['model']:42s} {eem.family:24s} {row['base_gmacs']:6.2f} GMACs  exits "
            + ", ".join(
                f"{n}@{f:.2f}" for n, f in zip(row["exits"], row["exit_mac_fraction"], strict=True)
            )
            + "  heads "
            + " ".join(f"{k}={v:.3%}" for k, v in head_fraction.items()),
            flush=True,
        )
        eem.remove()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "models": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
