"""Trade-off report on a real labelled stream: what early exit saves, what it costs, vs baselines.

Stream: the ``digits`` reference workload (``earlyexit.evaluation.workloads.load_workload``) when
it is installed with its trained backbone; otherwise a self-contained stand-in built here from
scikit-learn's bundled handwritten digits (8x8 glyphs rendered at 3x32x32 with random shifts,
rotations, blur and noise so difficulty varies per sample), with a timm resnet18 trained on a
disjoint split for a few epochs. The report says which one was used.

Methods, all on the same backbone and the same held-out evaluation stream:

* online heads (label-free): exit heads trained by self-distillation from the full model's own
  outputs on the traffic split (``OnlineDistiller`` when the library has it, else the offline
  distillation helper on the recorded traffic), thresholds calibrated on traffic to 99%
  agreement: the operating point; plus a threshold sweep, PABEE patience, max-softmax 0.5;
* SDN heads: the same heads trained offline with labels (cross-entropy, frozen backbone), swept
  and calibrated the same way;
* the oracle and the full model.

Writes ``benchmarks/results/digits_report.{json,md,png}`` (``--out``/``--name`` to change).

Usage:
    python benchmarks/tradeoff.py            # ~3-6 minutes on 2 CPU cores (stand-in data)
    python benchmarks/tradeoff.py --quick    # smaller splits, fewer epochs
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
import earlyexit as ee
from earlyexit.evaluation.baselines import calibrate_greedy, train_heads
from earlyexit.evaluation.latency import stream_latency
from earlyexit.evaluation.report import build_report, model_meta, write_report
from earlyexit.evaluation.stream import record_stream

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ stand-in stream


def render_digits(n_per_source: int, sources: torch.Tensor, labels: torch.Tensor, seed: int):
    """Render 8x8 glyphs as 3x32x32 images with per-sample difficulty (shift, rotation, blur, noise)."""
    g = torch.Generator().manual_seed(seed)
    glyphs = sources.repeat(n_per_source, 1, 1)[:, None].float() / 16.0  # [N, 1, 8, 8]
    ys = labels.repeat(n_per_source)
    n = glyphs.shape[0]
    difficulty = torch.rand(n, generator=g)  # 0 easy .. 1 hard
    angle = (torch.rand(n, generator=g) - 0.5) * 2 * math.radians(35) * difficulty
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.5 * difficulty[:, None]
    scale = 1.0 + (torch.rand(n, generator=g) - 0.5) * 0.5 * difficulty
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    big = F.interpolate(glyphs, size=32, mode="bilinear", align_corners=False)
    grid = F.affine_grid(theta, list(big.shape), align_corners=False)
    img = F.grid_sample(big, grid, align_corners=False, padding_mode="zeros")
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    blurred = F.conv2d(img, blur[None, None], padding=1)
    mix = difficulty[:, None, None, None]
    img = (1 - mix) * img + mix * blurred
    img = img + torch.randn(img.shape, generator=g) * (0.05 + 0.35 * mix)
    tint = 0.6 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    img = (img.expand(-1, 3, -1, -1) * tint - 0.25) / 0.3
    order = torch.randperm(n, generator=g)
    return img[order].contiguous(), ys[order]


def standin_workload(quick: bool, seed: int = 0):
    """(model, traffic (x, y), evaluation (x, y), description), from sklearn digits."""
    import timm
    from sklearn.datasets import load_digits

    digits = load_digits()
    glyphs = torch.tensor(digits.images, dtype=torch.float32)
    labels = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    # Disjoint source glyphs: 50% train the backbone, 25% traffic, 25% evaluation.
    a, b = len(perm) // 2, 3 * len(perm) // 4
    splits = {"train": perm[:a], "traffic": perm[a:b], "evaluation": perm[b:]}
    reps = 2 if quick else 4
    data = {
        k: render_digits(reps, glyphs[idx], labels[idx], seed + i)
        for i, (k, idx) in enumerate(splits.items())
    }
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    x, y = data["train"]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    epochs = 2 if quick else 4
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, 2e-3, total_steps=epochs * math.ceil(len(y) / 64)
    )
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y))
        total = 0.0
        for i in range(0, len(y), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log(f"  backbone epoch {epoch + 1}/{epochs}: loss {total / len(y):.3f}")
    model.eval()
    desc = (
        f"stand-in for the digits workload: timm resnet18 trained here for {epochs} epochs on "
        f"{len(data['train'][1])} renders of sklearn digits (3x32x32, per-sample difficulty); "
        f"{len(data['traffic'][1])} traffic / {len(data['evaluation'][1])} evaluation renders of "
        "disjoint source glyphs"
    )
    return model, data["traffic"], data["evaluation"], desc, ("timm resnet18", "digits stand-in")


def digits_workload(quick: bool):
    """The reference workload, if this checkout has it (branch ``workloads``) with its backbone."""
    try:
        from earlyexit.evaluation.workloads import load_workload
    except ImportError:
        return None
    try:
        kwargs = {"traffic_size": 1500, "eval_size": 800} if quick else {}
        w = load_workload("digits", **kwargs)
    except Exception as err:  # e.g. the trained backbone is not shipped yet
        log(f"digits workload unavailable ({type(err).__name__}: {err}); using the stand-in")
        return None

    def stack(ds):
        xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
        return torch.stack(xs), torch.tensor(ys)

    return (
        w.model.eval(),
        stack(w.traffic),
        stack(w.evaluation),
        w.description,
        (w.name, "digits workload"),
    )


# ------------------------------------------------------------------------------ online heads


def online_heads(eem, traffic, target: float, quick: bool) -> str:
    """Train the wrapper's heads label-free on the traffic and set calibrated thresholds."""
    x, _ = traffic
    if hasattr(ee, "OnlineDistiller") and hasattr(ee, "DistillConfig"):
        learner = ee.OnlineDistiller(eem, ee.DistillConfig(target_agreement=target))
        for _ in range(1 if quick else 2):
            for i in range(0, len(x), 32):
                learner.step(x[i : i + 32])
        return "OnlineDistiller (online, label-free)"
    rec = record_stream(eem, x, keep_features=True, progress=True, desc="recording traffic")
    heads = train_heads(
        list(eem.heads),
        rec.features,
        rec.final_logits,
        objective="distill",
        epochs=20 if quick else 40,
    )
    for mine, trained in zip(eem.heads, heads, strict=True):
        mine.load_state_dict(trained.state_dict())
    eem.set_thresholds(calibrate_greedy(rec.with_heads(list(eem.heads), eem.gate), target))
    return "offline self-distillation on the recorded traffic (label-free) + greedy calibration"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--standin", action="store_true", help="use the stand-in stream even if the workload exists"
    )
    parser.add_argument(
        "--target", type=float, default=0.99, help="agreement target for calibration"
    )
    parser.add_argument("--head", default="linear")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="digits_report")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)

    loaded = None if args.standin else digits_workload(args.quick)
    if loaded is None:
        log("building the stand-in digits stream and training its backbone ...")
        loaded = standin_workload(args.quick)
    model, traffic, evaluation, description, (model_label, stream_label) = loaded
    eem = ee.wrap(model, input_size=tuple(evaluation[0].shape[1:]), head=args.head)
    log(f"wrapped: exits {[p.name for p in eem.exits]}")

    how = online_heads(eem, traffic, args.target, args.quick)
    log(f"online heads: {how}; thresholds {eem.thresholds}")

    # SDN baseline: the same heads trained with labels on the traffic split, calibrated there too.
    train = record_stream(
        eem,
        traffic[0],
        labels=traffic[1],
        keep_features=True,
        progress=True,
        desc="recording traffic",
    )
    sdn_heads = train_heads(
        list(eem.heads), train.features, train.labels, epochs=20 if args.quick else 40
    )
    sdn_thresholds = calibrate_greedy(train.with_heads(sdn_heads, eem.gate), args.target)

    record = record_stream(
        eem,
        evaluation[0],
        labels=evaluation[1],
        keep_features=True,
        progress=True,
        desc="recording evaluation",
    )
    sdn_record = record.with_heads(sdn_heads, eem.gate)
    log("timing wrapped vs base on evaluation samples ...")
    latency = stream_latency(
        eem,
        evaluation[0][:64],
        batch=32,
        reps_b1=20 if args.quick else 40,
        reps_batched=3 if args.quick else 6,
    )
    record.features = None
    report = build_report(
        record,
        eem.thresholds,
        sdn_record=sdn_record,
        sdn_thresholds=sdn_thresholds,
        latency=latency,
        model=model_meta(eem, model_label),
        stream={
            "name": stream_label,
            "description": description,
            "online_heads": how,
            "calibration_target": args.target,
        },
        progress=True,
        notes=[
            f"Online heads: {how}. SDN heads: trained offline with labels on the traffic split "
            f"(cross-entropy, frozen backbone), calibrated there to {args.target:.0%} agreement.",
            "Operating points are calibrated on the traffic split and evaluated on the held-out "
            "evaluation split; curves sweep one shared threshold over all exits.",
            f"Latency on CPU with {int(latency['threads'])} threads on a shared machine: ratios "
            "from one interleaved run; batch-1 ratio is of mean latency over real samples.",
        ],
    )
    report["elapsed_s"] = time.perf_counter() - started
    paths = write_report(report, args.out, args.name)
    print(paths["md"].read_text())
    log(f"wrote {', '.join(str(p) for p in paths.values())} in {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
