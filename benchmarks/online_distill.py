"""Online self-distillation end to end: stream a workload's traffic through an OnlineDistiller,
then measure the learned policy on held-out traffic.

Prints, per workload, at the target agreement (default 0.99 at 95% confidence):

- agreement with the full model on held-out traffic (all samples, and among early exits);
- accuracy vs labels of the full model and of the early-exit policy (labelled workloads);
- MAC saving of the policy, the oracle's saving (each sample leaves at the first head whose argmax
  equals the final one, heads on the way counted) and their ratio;
- for reference, the best a shared threshold could do in hindsight on the held-out stream itself
  (served gate scores, and the heads' max softmax), and the best per-exit thresholds on the served
  gate's scores, as a share of the oracle: the ceiling the heads allow before any evidence is spent
  proving the target;
- how well the online heads learned: each head's agreement with the full model on held-out traffic,
  next to copies of the same initial heads distilled offline to convergence (``--offline-epochs``
  epochs of AdamW on every training-side row the learner stored, same loss, lr and batch size),
  and what learning took: optimizer steps, the replay ratio at the end, and the learning cost
  (learning MACs over served MACs, all stream and recent; learning over serving wall-clock);
- the learning overhead during warm-up: wall-clock of ``learner.step(x)`` vs plain ``model(x)`` on
  the same batches, timed side by side (alternating order) so machine noise hits both, over the
  first ``--timed-batches`` batches served while every gate is still closed.

Results go to ``benchmarks/results/online_distill_<workload>.json``.

Example:
    python benchmarks/online_distill.py --workload digits
    python benchmarks/online_distill.py --workload digits --seed 0 1 2   # + mean/min/max summary
    python benchmarks/online_distill.py --workload photos --traffic 2400
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
import earlyexit as ee
from earlyexit.distill import DistillConfig, OnlineDistiller
from earlyexit.distill.offline import fit_head
from earlyexit.distill.trainer import distillation_loss
from earlyexit.evaluation import record_stream, sweep_thresholds
from earlyexit.evaluation.policies import (
    default_grid,
    evaluate_exits,
    oracle_exits,
    threshold_exits,
)
from earlyexit.evaluation.stream import StreamRecord, iterate_batches

RESULTS = Path(__file__).resolve().parent / "results"


def evaluate(eem: ee.EarlyExitModel, dataset, batch_size: int) -> tuple[dict, StreamRecord]:
    """Serve held-out traffic with the frozen policy, recorded once with every sample also run to
    the end (audit), so agreement, accuracy, the oracle and the hindsight ceilings all come from
    the same pass. Returns the figures and the record."""
    record = record_stream(eem, dataset, batch_size=batch_size)
    thresholds = record.recorded_thresholds
    served = evaluate_exits(record, record.served_exit, thresholds=thresholds)
    oracle = evaluate_exits(record, oracle_exits(record))  # every head on the way paid for
    exit_rate = 1.0 - served.exit_rates[-1]
    labels = record.labels
    return {
        "samples": record.num_samples,
        "agreement": served.agreement,
        "agreement_exited": _exited_agreement(served) if exit_rate else None,
        "exit_rate": exit_rate,
        "accuracy_full": None
        if labels is None
        else int((record.final_pred == labels).sum()) / record.num_samples,
        "accuracy_early": served.accuracy,
        "mac_saving": served.mac_saving,
        "oracle_mac_saving": oracle.mac_saving,
        "saving_vs_oracle": served.mac_saving / oracle.mac_saving
        if oracle.mac_saving > 0
        else None,
        "per_exit": [
            {
                "threshold": thresholds[i] if i < record.num_exits else None,
                "exit_rate": rate,
                "agreement": agreement,
            }
            for i, (rate, agreement) in enumerate(
                zip(served.exit_rates, served.exit_agreement, strict=True)
            )
        ],
    }, record


def _exited_agreement(point) -> float:
    """Agreement with the full model among the samples a policy let out early (1.0 if none)."""
    early = [
        (r, a) for r, a in zip(point.exit_rates[:-1], point.exit_agreement[:-1], strict=True) if r
    ]
    left = sum(r for r, _ in early)
    return sum(r * a for r, a in early) / left if left else 1.0


def hindsight(record: StreamRecord, target: float) -> dict:
    """The best a shared threshold could do on the held-out stream itself, chosen in hindsight
    (no confidence bound, no evidence limit): for the served gate's scores and for the heads'
    max softmax. Separates what the heads allow (this ceiling vs the oracle) from what proving
    the target on finite evidence costs (the calibrated policy vs this ceiling)."""
    out = {}
    for score, key in (("gate", "served_gate"), ("max_softmax", "max_softmax")):
        points = sweep_thresholds(
            record, default_grid(record, levels=201, score=score), score=score
        )
        best = max(
            (p for p in points if _exited_agreement(p) >= target), key=lambda p: p.mac_saving
        )
        out[key] = {
            "mac_saving": best.mac_saving,
            "threshold": best.param,
            "exit_rate": 1.0 - best.exit_rates[-1],
            "agreement_exited": _exited_agreement(best),
        }
    out["served_gate_per_exit"] = _best_per_exit(record, target, start=out["served_gate"])
    return out


def _best_per_exit(record, target: float, start: dict, rounds: int = 3, levels: int = 101) -> dict:
    """Per-exit thresholds on the served gate's scores, chosen in hindsight on the held-out stream
    by coordinate ascent from the best shared threshold: whether one shared threshold is what
    holds the policy back (it is not, when this ceiling is close to the shared one)."""

    def point(thresholds):
        return evaluate_exits(record, threshold_exits(record, thresholds), thresholds=thresholds)

    thresholds = [float(start["threshold"])] * record.num_exits
    best = point(thresholds)
    for _ in range(rounds):
        for e in range(record.num_exits):
            grid = torch.quantile(record.scores[:, e].float(), torch.linspace(0, 1, levels))
            for t in [*grid.tolist(), math.inf]:
                trial = list(thresholds)
                trial[e] = t
                p = point(trial)
                if _exited_agreement(p) >= target and p.mac_saving > best.mac_saving:
                    best, thresholds = p, trial
    return {
        "mac_saving": best.mac_saving,
        "thresholds": thresholds,
        "exit_rate": 1.0 - best.exit_rates[-1],
        "agreement_exited": _exited_agreement(best),
    }


def run(name: str, args: argparse.Namespace, seed: int) -> dict:
    from earlyexit.evaluation.workloads import load_workload

    t_start = time.perf_counter()
    w = load_workload(name, traffic_size=args.traffic, eval_size=args.eval, seed=seed)
    model = w.model.eval()
    eem = ee.wrap(model, head=args.head, input_size=w.input_size)
    overrides = _parse_overrides(args.set)
    config = DistillConfig(
        **{
            "target_agreement": args.target,
            "confidence": args.confidence,
            "seed": seed,
            **overrides,
        }
    )
    learner = OnlineDistiller(eem, config)
    initial_heads = copy.deepcopy(eem.heads)  # the offline reference starts from the same heads
    step_time = plain_time = 0.0
    warmup_batches = 0
    t_stream = time.perf_counter()
    served = 0
    for k, (x, _y) in enumerate(iterate_batches(w.traffic, batch_size=args.batch)):
        warm = all(t == math.inf for t in eem.thresholds)
        if warm and warmup_batches < args.timed_batches:
            # Side by side, alternating which goes first, on the same batch.
            for first in (0, 1) if k % 2 == 0 else (1, 0):
                t0 = time.perf_counter()
                if first == 0:
                    learner.step(x)
                    step_time += time.perf_counter() - t0
                else:
                    with torch.no_grad():
                        model(x)
                    plain_time += time.perf_counter() - t0
            warmup_batches += 1
        else:
            learner.step(x)
        served += x.shape[0]
    stream_s = time.perf_counter() - t_stream
    learner.calibrate()  # publish the last heads trained, calibrated on all evidence
    stats = learner.stats()
    t_eval = time.perf_counter()
    result, record = evaluate(eem, w.evaluation, args.batch)
    ceiling = hindsight(record, args.target)
    for key, best in ceiling.items():
        oracle = result["oracle_mac_saving"]
        best["share_of_oracle"] = best["mac_saving"] / oracle if oracle > 0 else None
        result[f"hindsight_{key}_saving"] = best["mac_saving"]
        result[f"hindsight_{key}_vs_oracle"] = best["share_of_oracle"]
    result["hindsight"] = ceiling
    result.update(heads_vs_offline(eem, learner, initial_heads, w.evaluation, args))
    eval_s = time.perf_counter() - t_eval
    overhead = step_time / plain_time - 1.0 if plain_time else None
    report = {
        "workload": name,
        "description": w.description,
        "model_macs": eem.base_macs,
        "exits": [
            {"name": e.name, "macs": e.macs, "head_macs": h}
            for e, h in zip(eem.exits, eem.head_macs, strict=True)
        ],
        "target_agreement": args.target,
        "confidence": args.confidence,
        "traffic_samples": served,
        **result,
        "warmup_overhead": overhead,
        "warmup_timed_batches": warmup_batches,
        "warmup_step_s": step_time,
        "warmup_plain_s": plain_time,
        "stream_s": stream_s,
        "eval_s": eval_s,
        "total_s": time.perf_counter() - t_start,
        "learner": {k: v for k, v in stats.items() if k != "exits"},
        "learner_exits": stats["exits"],
        "config": config.to_dict(),
        "head": args.head,
        "torch_threads": torch.get_num_threads(),
    }
    return report


def heads_vs_offline(eem, learner, initial_heads, dataset, args) -> dict:
    """Each head's agreement with the full model on held-out traffic: the online heads, and
    copies of the initial heads distilled offline to convergence on every training-side row the
    learner stored (its replay: features and teacher logits), same loss, lr, batch size."""
    cfg = learner.config
    rows = learner.trainer.replay.view()
    teacher = rows["teacher"].float()
    g = torch.Generator().manual_seed(cfg.seed)
    offline = copy.deepcopy(initial_heads).float()

    def loss(logits, target):
        return distillation_loss(logits, target, cfg.temperature, cfg.hard_label_weight)

    for i, head in enumerate(offline):
        fit_head(
            head,
            rows[f"z{i}"].float(),
            teacher,
            loss,
            epochs=args.offline_epochs,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            generator=g,
            weight_decay=cfg.weight_decay,
        )
        head.eval()
    record = record_stream(eem, dataset, batch_size=args.batch, keep_features=True)
    with torch.no_grad():
        other = record.with_heads(offline, eem.gate)

    def agreement(rec) -> list[float]:
        return (rec.preds == rec.final_pred[:, None]).float().mean(0).tolist()

    online_agree, offline_agree = agreement(record), agreement(other)
    stats = learner.stats()
    return {
        "head_agreement_online": online_agree,
        "head_agreement_offline": offline_agree,
        "head_agreement_gap": sum(b - a for a, b in zip(online_agree, offline_agree, strict=True))
        / len(online_agree),
        "offline_rows": int(teacher.shape[0]),
        "offline_epochs": args.offline_epochs,
        "train_steps": stats["train_steps"],
        "replay_ratio_end": stats["replay_ratio"],
        "learning_macs_ratio": stats["learning_cost"]["macs_ratio_total"],
        "learning_macs_ratio_recent": stats["learning_cost"]["macs_ratio_recent"],
        "learning_seconds_ratio": stats["learning_cost"]["seconds_ratio_total"],
    }


def _parse_overrides(items: list[str]) -> dict:
    """``["train_time_budget=none", "batch_size=256"]`` -> DistillConfig keyword arguments."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes key=value (a DistillConfig field), got {item!r}")
        out[key] = None if raw.lower() == "none" else json.loads(raw.lower())
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workload",
        default="digits",
        help="digits, fashion, photos, textures_resnet, textures_vit or all (every one of them)",
    )
    parser.add_argument(
        "--traffic", type=int, default=None, help="traffic samples (default: workload's)"
    )
    parser.add_argument("--eval", type=int, default=None, help="held-out samples")
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--head", default="linear")
    parser.add_argument(
        "--timed-batches",
        type=int,
        default=64,
        help="warm-up batches timed side by side with plain model(x) (the overhead is an average: "
        "training steps come in bursts as rows join replay, calibrations every few hundred "
        "samples)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="one or more seeds (workload draw, audits, evidence split, replay); with several, "
        "one JSON per seed plus a summary (mean, min, max)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a DistillConfig field, e.g. --set train_time_budget=none (repeatable)",
    )
    parser.add_argument(
        "--offline-epochs",
        type=int,
        default=100,
        help="epochs of the offline reference heads (distilled to convergence on the same rows)",
    )
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    names = (
        ("digits", "fashion", "photos", "textures_resnet", "textures_vit")
        if args.workload == "all"
        else (args.workload,)
    )
    seeds = list(dict.fromkeys(args.seed))
    rows, columns = [], []
    for name in names:
        reports = []
        for seed in seeds:
            report = run(name, args, seed)
            suffix = "" if len(seeds) == 1 else f"_seed{seed}"
            out = Path(args.out) if args.out else RESULTS / f"online_distill_{name}{suffix}.json"
            if args.out and len(seeds) > 1:
                out = out.with_name(f"{out.stem}{suffix}{out.suffix}")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2))
            print(f"[{name} seed {seed}] {report['description']}", file=sys.stderr)
            print(f"  wrote {out}", file=sys.stderr)
            reports.append(report)
            rows.append(report)
            columns.append(name if len(seeds) == 1 else f"{name}:{seed}")
        if len(seeds) > 1:
            summary = _summary(name, seeds, reports)
            out = (
                RESULTS / f"online_distill_{name}_seeds.json"
                if not args.out
                else Path(args.out).with_name(f"{Path(args.out).stem}_seeds.json")
            )
            out.write_text(json.dumps(summary, indent=2))
            print(f"  wrote {out}", file=sys.stderr)
            rows.append(summary["mean"])
            columns.append(f"{name}:mean")
    print(f"{'metric':<22}" + "".join(f"{c:>12}" for c in columns))
    for key, label in _KEYS:
        print(f"{label:<22}" + "".join(f"{_fmt(r.get(key)):>12}" for r in rows))
    return 0


_KEYS = [
    ("agreement", "agreement (all)"),
    ("agreement_exited", "agreement (exited)"),
    ("exit_rate", "exit rate"),
    ("accuracy_full", "accuracy full"),
    ("accuracy_early", "accuracy early-exit"),
    ("mac_saving", "MAC saving"),
    ("oracle_mac_saving", "oracle MAC saving"),
    ("saving_vs_oracle", "saving / oracle"),
    ("hindsight_served_gate_vs_oracle", "hindsight gate/oracle"),
    ("hindsight_max_softmax_vs_oracle", "hindsight msp/oracle"),
    ("hindsight_served_gate_per_exit_vs_oracle", "hindsight per-exit/or."),
    ("head_agreement_gap", "head agr. offline-online"),
    ("train_steps", "optimizer steps"),
    ("replay_ratio_end", "replay ratio at end"),
    ("learning_macs_ratio", "learning/serving MACs"),
    ("learning_macs_ratio_recent", "  recent"),
    ("learning_seconds_ratio", "learning/serving secs"),
    ("warmup_overhead", "warm-up overhead"),
    ("total_s", "total seconds"),
]


def _summary(name: str, seeds: list[int], reports: list[dict]) -> dict:
    """Mean, min and max of every printed metric over seeds (``None`` where a seed had none)."""
    stats: dict[str, dict] = {"mean": {}, "min": {}, "max": {}}
    for key, _label in _KEYS:
        values = [r[key] for r in reports if isinstance(r.get(key), int | float)]
        if values:
            stats["mean"][key] = sum(values) / len(values)
            stats["min"][key] = min(values)
            stats["max"][key] = max(values)
    return {"workload": name, "seeds": seeds, **stats}


if __name__ == "__main__":
    raise SystemExit(main())
