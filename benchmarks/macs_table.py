"""MACs of five torchvision models vs their published figures, and the per-exit table of a
wrapped resnet50 / vit_b_16 (random weights: MACs do not depend on weight values).

Published: ``weights.meta["_ops"]`` (GFLOPS where one multiply-add is one op). Counted: the
dispatch counter (``count_macs``, meta tensors) and fvcore with the aligned convention
(``fvcore_macs``, a real forward pass: slower). Writes ``benchmarks/results/macs.json``.

Usage:
    python benchmarks/macs_table.py [--no-fvcore]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
import earlyexit as ee
from earlyexit.evaluation import count_macs, fvcore_macs, mac_breakdown

MODELS = ("resnet50", "vit_b_16", "convnext_tiny", "efficientnet_b0", "mobilenet_v3_large")
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-fvcore", action="store_true", help="skip the (slower) fvcore column")
    args = parser.parse_args(argv)
    rows, tables = [], {}
    print(
        "| model | published GMACs | count_macs | diff | fvcore_macs | diff | fvcore unsupported ops |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in MODELS:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        published = weights.meta["_ops"] * 1e9
        model = torchvision.models.get_model(name, weights=None).eval()
        ours = count_macs(model, (1, 3, 224, 224))
        fv = None if args.no_fvcore else fvcore_macs(model, (1, 3, 224, 224))
        row = {
            "model": name,
            "published": published,
            "count_macs": ours,
            "count_macs_rel": ours / published - 1,
            "fvcore_macs": None if fv is None else fv.total,
            "fvcore_rel": None if fv is None else fv.total / published - 1,
            "fvcore_unsupported": None if fv is None else fv.unsupported_ops,
        }
        rows.append(row)
        fv_cells = (
            "| | |"
            if fv is None
            else f"| {fv.total / 1e9:.3f} | {100 * row['fvcore_rel']:+.2f}% | {fv.unsupported_ops or 'none'} |"
        )
        print(
            f"| {name} | {published / 1e9:.3f} | {ours / 1e9:.3f} | {100 * row['count_macs_rel']:+.2f}% {fv_cells}"
        )
        if name in ("resnet50", "vit_b_16"):
            eem = ee.wrap(model)
            table = mac_breakdown(eem, method="dispatch" if args.no_fvcore else "fvcore")
            tables[name] = table.to_dict()
            print(f"\nwrapped {name} (linear heads, auto exits):\n\n{table.to_markdown()}\n")
            eem.remove()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "macs.json"
    out.write_text(json.dumps({"models": rows, "wrapped": tables}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
