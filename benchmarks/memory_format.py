"""Batched wall-clock of early exit on a CPU, with the model in PyTorch's default layout and in
channels-last: why a batch whose rows leave at different exits can be slower than the base model.

When some rows of a batch leave at an exit, the rest continue as a smaller batch. On one CPU
thread PyTorch runs a 1x1 convolution of fewer than 16 rows in the default (NCHW) layout with
its reference kernel (``aten::_slow_conv2d_forward``, a matrix product per sample), several times
slower than oneDNN on small feature maps; the base model at batch 32 never takes that path, the
survivors of its exits do. In a model converted to channels-last (``model.to(memory_format=
torch.channels_last)``, inputs too) the same operator runs on channels-last rows, which measured
several times faster on these small maps; the survivors keep the layout (row selection keeps it),
so the base model is faster at every batch and the survivors lose less.

For the fine-tuned EfficientNet-Lite0 of the fashion workload (64x64) with heads learned on the
fashion stream (as ``earlyexit demo`` learns them, seed 0; or ``--heads PATH``), this times, on
the same Fashion-MNIST test batches, interleaved round by round: the base model and the wrapped
model in each layout, at each batch size; and counts the reference-kernel calls per batch.

Usage:
    python benchmarks/memory_format.py                  # batch 1, 4, 32; ~3 min
    python benchmarks/memory_format.py --batch-sizes 4 32 --heads heads.safetensors

Results: ``benchmarks/results/memory_format.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_batch1 import learned_heads
from serve_load import fashion_test_images

import earlyexit as ee
from earlyexit.evaluation.workloads._fashion import load_fashion_backbone

CHANNELS_LAST = torch.channels_last
REFERENCE_KERNEL = "aten::_slow_conv2d_forward"


def reference_kernel_calls(fn, batches: list[torch.Tensor]) -> float:
    """Calls to PyTorch's reference convolution kernel per batch."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x in batches:
            fn(x)
    calls = sum(e.count for e in prof.key_averages() if e.key == REFERENCE_KERNEL)
    return calls / len(batches)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 32])
    parser.add_argument("--samples", type=int, default=1024, help="test images timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--heads", help="heads saved with eem.save (default: learn them here)")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_fashion_backbone().eval()
    heads = (
        Path(args.heads)
        if args.heads
        else learned_heads(Path(tempfile.mkdtemp(prefix="earlyexit-format-")) / "h.safetensors")
    )
    channels_last = copy.deepcopy(model).to(memory_format=CHANNELS_LAST)
    wrapped = {"nchw": ee.load(model, heads), "channels_last": ee.load(channels_last, heads)}
    xs = torch.cat(fashion_test_images(args.samples))

    def arms(layout: str) -> dict:
        base = model if layout == "nchw" else channels_last
        eem = wrapped[layout]
        if layout == "nchw":
            return {"base": base, "early_exit": eem.predict}
        return {
            "base": lambda x: base(x.contiguous(memory_format=CHANNELS_LAST)),
            "early_exit": lambda x: eem.predict(x.contiguous(memory_format=CHANNELS_LAST)),
        }

    calls = {layout: arms(layout) for layout in wrapped}
    rows = []
    with torch.no_grad():
        spent = 0
        for e in wrapped["nchw"].predict(xs).exit_index.tolist():
            spent += wrapped["nchw"].path_macs()[e]
        saving = 1.0 - spent / (len(xs) * wrapped["nchw"].base_macs)
        for b in args.batch_sizes:
            batches = [xs[i : i + b] for i in range(0, len(xs) - b + 1, b)]
            seconds = {(layout, arm): 0.0 for layout in calls for arm in calls[layout]}
            for fn in (f for layout in calls for f in calls[layout].values()):
                for x in batches[:3]:  # warm-up
                    fn(x)
            for _ in range(args.rounds):
                for x in batches:  # every arm on the same batch, one after the other
                    for layout, fns in calls.items():
                        for arm, fn in fns.items():
                            began = time.perf_counter()
                            fn(x)
                            seconds[layout, arm] += time.perf_counter() - began
            samples = args.rounds * len(batches) * b
            for layout, fns in calls.items():
                base_s, exit_s = seconds[layout, "base"], seconds[layout, "early_exit"]
                rows.append(
                    {
                        "batch": b,
                        "layout": layout,
                        "base_ms_per_image": 1e3 * base_s / samples,
                        "early_exit_ms_per_image": 1e3 * exit_s / samples,
                        "time_ratio": exit_s / base_s,
                        "time_vs_nchw_base": exit_s / seconds["nchw", "base"],
                        "reference_kernel_calls_per_batch": {
                            arm: reference_kernel_calls(fn, batches[:8]) for arm, fn in fns.items()
                        },
                    }
                )
                r = rows[-1]
                print(
                    f"batch {b:3d} {layout:13s} base {r['base_ms_per_image']:.2f} ms/img, "
                    f"early exit {r['early_exit_ms_per_image']:.2f} ms/img: ratio "
                    f"{r['time_ratio']:.2f} (vs the NCHW base {r['time_vs_nchw_base']:.2f}); "
                    f"reference-kernel calls per batch {r['reference_kernel_calls_per_batch']}",
                    flush=True,
                )
    for eem in wrapped.values():
        eem.remove()
    report = {
        "command": " ".join(sys.argv),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        "heads": str(heads) if args.heads else "learned on the fashion stream, seed 0",
        "mac_saving": saving,
        "rows": rows,
    }
    out = Path(args.out or Path(__file__).parent / "results" / "memory_format.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"MAC saving of the heads on these images: {saving:.1%}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
