"""Traffic that looks like production: class-skewed (Zipf) streams, and a stream whose mix shifts.

Two experiments on one labelled workload, per seed, with the label-free online learner
(``OnlineDistiller``) at the target agreement:

1. **Skew**: for each Zipf exponent (``--skews``, 0 = uniform), stream ``--traffic`` samples whose
   classes follow Zipf over a seeded class ranking, then evaluate the learned policy on held-out
   traffic with the same skew (same ranking, disjoint samples). Savings should rise with skew: the
   heads have fewer classes to be sure of.
2. **Shift**: stream ``2 x --traffic`` samples, Zipf(``--shift-exponent``) over one ranking for the
   first half and over the reversed ranking for the second (the dominant classes become the
   rarest). Every served batch is also run through the unwrapped model (measurement only, never
   shown to the learner), so the agreement of *what was served* is known exactly, per window of
   ``--window`` samples: all answers, and early answers only. Reported: agreement served before
   and after the shift, the worst window after it, samples after the shift until the learner
   reacts (a drift or mix alarm, or a recalibration that tightens the gates) and until gates reopen, and
   the MAC saving before and after.

Prints a table per experiment and writes ``benchmarks/results/traffic_shapes_<workload>.json``
(and a PNG of the shift run when matplotlib is installed).

Example:
    python benchmarks/traffic_shapes.py --workload digits --seed 0 1 2 --threads 1
    python benchmarks/traffic_shapes.py --quick            # small sizes, a smoke run
    python benchmarks/traffic_shapes.py --set guarantee=\\"expected\\"   # any DistillConfig field
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_distill import _fmt, _parse_overrides, evaluate

import earlyexit as ee
from earlyexit._json import json_safe
from earlyexit.distill import DistillConfig, OnlineDistiller
from earlyexit.evaluation.stream import iterate_batches
from earlyexit.evaluation.traffic_shapes import ShapedStream, dataset_labels

RESULTS = Path(__file__).resolve().parent / "results"


def _learner(model, input_size, args, seed: int) -> tuple[ee.EarlyExitModel, OnlineDistiller]:
    eem = ee.wrap(model, head=args.head, input_size=input_size)
    config = DistillConfig(
        **{
            "target_agreement": args.target,
            "confidence": args.confidence,
            "seed": seed,
            **_parse_overrides(args.set),
        }
    )
    return eem, OnlineDistiller(eem, config)


def _pools(name: str, args, seed: int):
    """The workload with pools large enough to draw skewed streams without running dry."""
    from earlyexit.evaluation.workloads import load_workload

    # Fashion has 10,000 images in all: its pools are what it has (repeats are counted).
    traffic = None if name == "fashion" else args.pool_factor * args.traffic * 2
    evaluation = None if name == "fashion" else args.pool_factor * args.eval
    w = load_workload(name, traffic_size=traffic, eval_size=evaluation, seed=seed)
    if not w.labelled:
        raise SystemExit(f"workload {name!r} has no labels: a class-skewed stream needs them")
    return w


def skew_run(w, exponent: float, args, seed: int) -> dict:
    """Stream Zipf(``exponent``) traffic through a fresh learner; evaluate on skewed held-out."""
    traffic_labels = dataset_labels(w.traffic)
    stream = ShapedStream.zipf(traffic_labels, args.traffic, exponent, seed)
    held_out = ShapedStream.zipf(
        dataset_labels(w.evaluation), args.eval, exponent, seed + 1000, ranking=stream.rankings[0]
    )
    eem, learner = _learner(w.model.eval(), w.input_size, args, seed)
    served, first_open = 0, None
    t0 = time.perf_counter()
    for x, _y in iterate_batches(stream.subset(w.traffic), batch_size=args.batch):
        learner.step(x)
        served += x.shape[0]
        if first_open is None and any(math.isfinite(t) for t in eem.thresholds):
            first_open = served
    learner.calibrate()
    stats = learner.stats()
    result, _record = evaluate(eem, held_out.subset(w.evaluation), args.batch)
    return {
        "exponent": exponent,
        "traffic": stream.describe(traffic_labels, w.num_classes),
        "eval_repeats": held_out.repeats,
        "samples_to_first_open": first_open,
        "stream_s": time.perf_counter() - t0,
        "learner": {k: v for k, v in stats.items() if k != "exits"},
        **result,
    }


def shift_run(w, args, seed: int) -> dict:
    """Serve a stream whose class mix reverses halfway; track served agreement per window."""
    labels = dataset_labels(w.traffic)
    length = 2 * args.traffic
    stream = ShapedStream.shifting(labels, length, args.shift_exponent, seed, shift_at=args.traffic)
    model = w.model.eval()
    eem, learner = _learner(model, w.input_size, args, seed)
    macs = eem.base_macs
    windows, current = [], None
    served = 0
    for x, _y in iterate_batches(stream.subset(w.traffic), batch_size=args.batch):
        before = learner.stats()
        res = learner.step(x)
        with torch.no_grad():
            truth = model(x).argmax(1)  # measurement only: the learner never sees it
        after = learner.stats()
        answer = res.logits.argmax(1)
        early = res.exit_index < eem.num_exits
        if current is None or current["samples"] >= args.window:
            current = {
                "start": served,
                "samples": 0,
                "agree": 0,
                "early": 0,
                "early_agree": 0,
                "open_batches": 0,
                "batches": 0,
                "drift_alarms": 0,
                "mix_shifts": 0,
                "calibrations": 0,
                "macs_spent": 0.0,
            }
            windows.append(current)
        agree = answer == truth
        current["samples"] += x.shape[0]
        current["agree"] += int(agree.sum())
        current["early"] += int(early.sum())
        current["early_agree"] += int((agree & early).sum())
        current["batches"] += 1
        current["open_batches"] += int(any(math.isfinite(t) for t in eem.thresholds))
        current["drift_alarms"] += after["drift_alarms"] - before["drift_alarms"]
        current["mix_shifts"] += after["mix_shifts"] - before["mix_shifts"]
        current["calibrations"] += after["calibrations"] - before["calibrations"]
        # Total saving counter's delta gives this batch's spend (audits included).
        spent_before = (1.0 - before["mac_saving_total"]) * before["samples"] * macs
        spent_after = (1.0 - after["mac_saving_total"]) * after["samples"] * macs
        current["macs_spent"] += spent_after - spent_before
        current["phase"] = after["phase"]
        served += x.shape[0]
    for win in windows:
        win["agreement"] = win["agree"] / win["samples"]
        win["agreement_early"] = win["early_agree"] / win["early"] if win["early"] else None
        win["exit_rate"] = win["early"] / win["samples"]
        win["mac_saving"] = 1.0 - win["macs_spent"] / (win["samples"] * macs)
    shift = args.traffic
    before = [w_ for w_ in windows if w_["start"] + w_["samples"] <= shift]
    after = [w_ for w_ in windows if w_["start"] >= shift]

    def pooled(ws, key_num, key_den):
        den = sum(w_[key_den] for w_ in ws)
        return sum(w_[key_num] for w_ in ws) / den if den else None

    def first(ws, predicate):
        hit = next((w_ for w_ in ws if predicate(w_)), None)
        return None if hit is None else hit["start"] + hit["samples"] - shift

    exit_before = pooled(before[-3:], "early", "samples") or 0.0
    reaction = first(
        after,
        lambda w_: (
            w_["drift_alarms"] > 0
            or w_["mix_shifts"] > 0
            or (w_["samples"] and w_["early"] / w_["samples"] < 0.5 * exit_before)
        ),
    )
    # Closing and reopening only mean something if a gate was open when the mix reversed.
    open_at_shift = bool(before) and before[-1]["open_batches"] > 0
    closed_after = (
        first(after, lambda w_: w_["open_batches"] < w_["batches"]) if open_at_shift else None
    )
    reopen = None
    if closed_after is not None:
        later = [w_ for w_ in after if w_["start"] + w_["samples"] - shift > closed_after]
        reopen = first(later, lambda w_: w_["open_batches"] == w_["batches"] and w_["early"] > 0)
    worst = min(
        (w_["agreement_early"] for w_ in after if w_["agreement_early"] is not None),
        default=None,
    )
    return {
        "exponent": args.shift_exponent,
        "traffic": stream.describe(labels, w.num_classes),
        "shift_at": shift,
        "window": args.window,
        "agreement_before": pooled(before, "agree", "samples"),
        "agreement_after": pooled(after, "agree", "samples"),
        "agreement_early_before": pooled(before, "early_agree", "early"),
        "agreement_early_after": pooled(after, "early_agree", "early"),
        "worst_window_agreement_early_after": worst,
        "exit_rate_before": pooled(before, "early", "samples"),
        "exit_rate_after": pooled(after, "early", "samples"),
        "mac_saving_before": 1.0
        - sum(w_["macs_spent"] for w_ in before)
        / max(1, sum(w_["samples"] for w_ in before) * macs),
        "mac_saving_after": 1.0
        - sum(w_["macs_spent"] for w_ in after) / max(1, sum(w_["samples"] for w_ in after) * macs),
        "open_at_shift": open_at_shift,
        "samples_to_reaction": reaction if open_at_shift else None,
        "samples_to_gate_closing": closed_after,
        "samples_to_reopen": reopen,
        "drift_alarms": sum(w_["drift_alarms"] for w_ in windows),
        "mix_shifts": sum(w_["mix_shifts"] for w_ in windows),
        "windows": windows,
    }


def _plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(report["seeds"]), 1, figsize=(9, 3 * len(report["seeds"])))
    axes = [axes] if len(report["seeds"]) == 1 else list(axes)
    for ax, (seed, run) in zip(axes, report["seeds"].items(), strict=True):
        shift = run["shift"]
        xs = [w["start"] + w["samples"] for w in shift["windows"]]
        ax.plot(xs, [w["agreement"] for w in shift["windows"]], label="agreement, all served")
        ax.plot(
            xs,
            [w["agreement_early"] for w in shift["windows"]],
            label="agreement, early answers",
        )
        ax.plot(xs, [w["exit_rate"] for w in shift["windows"]], label="exit rate")
        ax.axhline(report["target"], color="grey", linestyle=":", label="target")
        ax.axvline(shift["shift_at"], color="red", linestyle="--", label="mix reverses")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{report['workload']}, seed {seed}: served agreement per window")
        ax.set_xlabel("samples served")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Each seed redraws the class ranking, the stream and the learner's coins.",
    )
    parser.add_argument("--workload", default="digits", help="a labelled workload (digits, ...)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--traffic", type=int, default=4000, help="samples per skewed stream")
    parser.add_argument("--eval", type=int, default=2000, help="held-out samples per skew")
    parser.add_argument(
        "--skews", type=float, nargs="+", default=[0.0, 1.0, 2.0], help="Zipf exponents"
    )
    parser.add_argument("--shift-exponent", type=float, default=1.5)
    parser.add_argument("--no-shift", action="store_true", help="skip the shift experiment")
    parser.add_argument("--window", type=int, default=256, help="samples per reported window")
    parser.add_argument(
        "--pool-factor", type=int, default=10, help="pool = factor x what a stream draws"
    )
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--head", default="linear")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a DistillConfig field (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.traffic, args.eval, args.skews, args.window = 600, 300, [0.0, 2.0], 128
    report = {
        "workload": args.workload,
        "target": args.target,
        "confidence": args.confidence,
        "traffic": args.traffic,
        "eval": args.eval,
        "overrides": args.set,
        "seeds": {},
    }
    for seed in dict.fromkeys(args.seed):
        torch.manual_seed(seed)
        w = _pools(args.workload, args, seed)
        run = {"skew": [skew_run(w, s, args, seed) for s in args.skews]}
        if not args.no_shift:
            run["shift"] = shift_run(w, args, seed)
        report["seeds"][str(seed)] = run
        print(f"[seed {seed}] {w.description}", file=sys.stderr)
        print(
            f"{'zipf exponent':<16}{'top share':>10}{'saving':>9}{'agree':>9}"
            f"{'agree ex.':>10}{'acc full':>9}{'acc early':>10}{'1st open':>9}"
        )
        for r in run["skew"]:
            top = r["traffic"]["segments"][0]["top_class_share"]
            print(
                f"{r['exponent']:<16}{_fmt(top):>10}{_fmt(r['mac_saving']):>9}"
                f"{_fmt(r['agreement']):>9}{_fmt(r['agreement_exited']):>10}"
                f"{_fmt(r['accuracy_full']):>9}{_fmt(r['accuracy_early']):>10}"
                f"{_fmt(r['samples_to_first_open']):>9}"
            )
        if "shift" in run:
            s = run["shift"]
            for key in (
                "agreement_before",
                "agreement_after",
                "agreement_early_before",
                "agreement_early_after",
                "worst_window_agreement_early_after",
                "exit_rate_before",
                "exit_rate_after",
                "mac_saving_before",
                "mac_saving_after",
                "samples_to_reaction",
                "samples_to_gate_closing",
                "samples_to_reopen",
                "drift_alarms",
                "mix_shifts",
            ):
                print(f"  shift {key:<36}{_fmt(s[key])}")
    name = f"traffic_shapes_{args.workload}"
    out = Path(args.out) if args.out else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(json_safe(report), indent=2))
    tmp.replace(out)
    print(f"wrote {out}", file=sys.stderr)
    if not args.no_shift and _plot(report, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
