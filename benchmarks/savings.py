"""Savings that hold: our online, label-free, calibrated policy against its yardsticks, side by
side on the same traffic, per workload and seed.

Every method sees the same rendered traffic split (to learn from) and is measured on the same
held-out evaluation split, with one MAC accounting (earlyexit's: torchvision's convention, every
head evaluated on the way included):

(a) **ours**: ``OnlineDistiller`` streams the traffic (``learner.step``, as ``earlyexit demo``
    serves it: ``PipelineOptions`` defaults, ``--config key=value`` on top), never sees a label,
    and opens its gates when its calibration proves the target; then its policy is frozen and
    served on the held-out split.
(b) **offline recipe** (``earlyexit.evaluation.baselines.offline_recipe``): linear heads (global
    average pool + fc) at the same exit modules, distilled from the final logits (KL at the
    learner's temperature, no labels) for ``--recipe-epochs`` epochs over ALL the traffic (it sees
    the future), then one shared max-softmax threshold, the first at which the last
    ``--calibration-share`` of the traffic reaches the target (a point estimate, no bound).
(c) **earlyon** (``earlyon==0.3.0``, the code of ``side_by_side.py``): its MLP heads at the same
    exit modules, trained with labels (with the full model's answers on an unlabelled workload),
    thresholds calibrated on the full model's answers at drop ``1 - target`` (matched agreement):
    its defaults row, and its best setting of a quick sweep chosen in hindsight on the evaluation
    split (which favours it).
(d) **oracle**: each sample leaves at the first of our heads that agrees with the full model.

Plus **our heads, offline to convergence**: fresh copies of our head kind distilled offline on
the same traffic for ``--converge-epochs`` epochs (cosine to zero), scored by our gate at our
calibrated thresholds: the agreement the online heads should come within one point of.

A method meets the target when its agreement with the full model reaches ``--target`` on the
held-out split (``--agreement-on exited``, the default: among the samples that left early, which
is what our calibration's target means; ``all``: over every sample). The verdict for ours: it
meets the target, and its saving is >= the recipe's and >= earlyon's (earlyon: its best row
that meets the target, else its defaults row).

Columns: MAC saving, agreement with the full model (all samples, and among early exits), exit
rate, accuracy of the full model and of the policy (labelled workloads); for ours also the
samples served before the first early exit (read from the learner's stats when it reports one,
else counted here per batch), the learner's amortised ``learning_cost`` when its stats have it,
and the converged heads' agreement.

Prints a Markdown table per workload and seed, then a summary over seeds (mean/min/max), and
writes ``benchmarks/results/savings_<workload>[_<head>].json`` (strict JSON).

earlyon is a benchmark peer, never a dependency: ``pip install --no-deps earlyon==0.3.0``.
Without it (or with ``--no-earlyon``) its rows are skipped with a note.

Runtime, one CPU thread, digits at its default sizes (4000 / 2000), measured on a 2-core machine
shared with other jobs (load ~10): 18 minutes of wall clock, of which ours 2.4, our heads to
convergence 4.4, the recipe 0.9 and earlyon 9 (its stage-2 training runs the whole backbone every
epoch); on an idle machine a fraction of that. ``--no-earlyon`` and a smaller
``--converge-epochs`` shorten it; pass ``--threads 1`` on a shared machine.

Example:
    python benchmarks/savings.py --workload digits --seed 0
    python benchmarks/savings.py --workload digits fashion --seed 0 1 2 --no-earlyon
    python benchmarks/savings.py --workload digits --config guarantee=expected
    python benchmarks/savings.py --workload digits --quick --no-earlyon   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))  # side_by_side's earlyon code
import side_by_side as sbs

from earlyexit.evaluation.baselines import converge_heads, offline_recipe
from earlyexit.evaluation.pipeline import PipelineOptions, learn_online
from earlyexit.evaluation.policies import evaluate_exits, evaluate_policy, oracle_exits
from earlyexit.evaluation.stream import iterate_batches, record_stream

RESULTS = Path(__file__).resolve().parent / "results"

OURS = "ours: online, label-free, calibrated"
RECIPE = "offline recipe: linear heads, distilled offline, one max-softmax threshold"
CONVERGED = "our heads, offline to convergence, at our thresholds"
ORACLE = "oracle (our heads)"
EARLYON_DEFAULTS = "earlyon, calibrated on full-model answers: defaults"
EARLYON_BEST = "earlyon, calibrated on full-model answers: best setting (hindsight)"
# Keys the learner may report for "samples served before the first saving", most specific first.
FIRST_SAVING_KEYS = ("first_saving_at", "first_gate_open_at", "first_early_exit_at")
ROW_NUMBERS = ("mac_saving", "agreement", "agreement_exited", "exit_rate", "accuracy_early")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ helpers


def parse_config(items: list[str]) -> dict[str, Any]:
    """``["guarantee=expected", "batch_size=32", "train_time_budget=none"]`` -> DistillConfig
    keyword arguments: JSON values where they parse (numbers, true/false, null; ``none`` is
    null), plain strings otherwise. The fields are checked by DistillConfig itself."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--config takes key=value (a DistillConfig field), got {item!r}")
        if raw.lower() == "none":
            out[key] = None
            continue
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def materialize(dataset: Any, batch_size: int = 256) -> tuple[Tensor, Tensor | None]:
    """Render a split once, so every method sees the very same tensors in one order."""
    xs, ys = [], []
    for x, y in iterate_batches(dataset, batch_size=batch_size):
        xs.append(x)
        if y is not None:
            ys.append(torch.as_tensor(y).long())
    if ys and len(ys) != len(xs):
        raise SystemExit("some batches of the workload have labels and some do not")
    return torch.cat(xs), (torch.cat(ys) if ys else None)


def as_data(x: Tensor, y: Tensor | None) -> Any:
    return TensorDataset(x, y) if y is not None else x


def point_dict(point: Any) -> dict[str, Any]:
    """A ``PolicyPoint`` as the figures of one row."""
    return {
        "mac_saving": point.mac_saving,
        "agreement": point.agreement,
        "agreement_exited": sbs.exited_agreement(point.exit_rates, point.exit_agreement),
        "exit_rate": 1.0 - point.exit_rates[-1],
        "accuracy_early": point.accuracy,
        "exit_rates": list(point.exit_rates),
        "exit_agreement": list(point.exit_agreement),
    }


def make_row(method: str, figures: dict[str, Any], goal: Any, accuracy_full: Any, **extra):
    return {
        "method": method,
        **figures,
        "accuracy_full": accuracy_full,
        "meets_target": goal.met(figures),
        **extra,
    }


# ------------------------------------------------------------------------------------ methods


def run_ours(w: Any, data: dict[str, Any], args: argparse.Namespace, seed: int) -> dict:
    """Our learner streams the traffic; then its frozen policy and heads are recorded."""
    options = PipelineOptions(
        target_agreement=args.target,
        confidence=args.confidence,
        seed=seed,
        batch_size=args.batch,
        progress=False,
        latency=False,
        distill=parse_config(args.config),
        **({"head": args.head} if args.head else {}),
    )
    config = options.distill_config()
    torch.manual_seed(seed)  # head initialisation, as the pipeline does
    start = time.perf_counter()
    # head "auto": the first samples choose places and kinds (counted in the stream's figures)
    run = learn_online(copy.deepcopy(w.model), data["traffic"], options, w.input_size)
    stream_s = time.perf_counter() - start
    eem, stats = run.learner.eem, run.stats
    first_key = next(k for k in FIRST_SAVING_KEYS if k in stats)
    evaluation = record_stream(eem, data["evaluation"], batch_size=64, keep_features=True)
    point = evaluate_exits(
        evaluation, evaluation.served_exit, thresholds=evaluation.recorded_thresholds
    )
    return {
        "eem": eem,
        "config": config,
        "stats": stats,
        "first_saving_at": stats[first_key],
        "first_saving_source": "learner stats"
        if first_key != "first_early_exit_at"
        else ("counted per batch while serving"),
        "learning_cost": stats.get("learning_cost"),
        "record": evaluation,
        "point": point,
        "stream_s": stream_s,
    }


def run_converged(ours: dict, data: dict[str, Any], args: argparse.Namespace, seed: int) -> dict:
    """Our head kind distilled offline on the traffic, scored at our calibrated thresholds."""
    eem = ours["eem"]
    traffic = record_stream(eem, data["traffic"], batch_size=64, keep_features=True)
    heads, curves = converge_heads(
        eem.heads,
        traffic.features,
        traffic.final_logits,
        temperature=ours["config"].temperature,
        epochs=args.converge_epochs,
        seed=seed,
    )
    scored = ours["record"].with_heads(heads, eem.gate)
    point = evaluate_policy(scored, "threshold", thresholds=list(eem.thresholds))
    # Relative change of the loss over the last fifth of the epochs: ~0 once settled.
    tail = max(1, args.converge_epochs // 5)
    settled = [
        (c[-1 - tail] - c[-1]) / c[-1 - tail] if len(c) > tail and c[-1 - tail] > 0 else None
        for c in curves
    ]
    return {
        "point": point,
        "loss_final": [c[-1] for c in curves],
        "loss_drop_last_fifth": settled,
    }


def run_recipe(w: Any, ours: dict, data: dict[str, Any], args: argparse.Namespace, seed: int):
    # The recipe's heads go where ours could go: with --head auto, every candidate place (the
    # chooser may have switched some off for ours), else our exits.
    choice = ours["stats"].get("head_choice")
    places = choice["places"] if choice else [e.name for e in ours["eem"].exits]
    recipe = offline_recipe(
        w.model,
        data["traffic"],
        exits=places,
        input_size=w.input_size,
        target=args.target,
        on=args.agreement_on,
        calibration_share=args.calibration_share,
        epochs=args.recipe_epochs,
        temperature=ours["config"].temperature,
        seed=seed,
    )
    record = recipe.record(data["evaluation"])
    return recipe, recipe.evaluate(record)


def run_earlyon(
    eo: SimpleNamespace, w: Any, ours: dict, data: dict[str, Any], args, seed: int, goal, oracle
) -> dict[str, Any]:
    """side_by_side's earlyon run: heads trained on the traffic, thresholds calibrated on the full
    model's answers, every setting replayed on the held-out split with our MAC accounting."""
    eem = ours["eem"]
    names = [e.name for e in eem.exits]
    full_tr = sbs.full_model_logits(w.model, data["x_traffic"]).argmax(dim=-1)
    full_ev = sbs.full_model_logits(w.model, data["x_eval"]).argmax(dim=-1)
    labelled = data["y_traffic"] is not None and data["y_eval"] is not None
    # Unlabelled: earlyon trains on the full model's answers (then its "accuracy" is agreement).
    stream = sbs.Stream(
        data["x_traffic"],
        data["y_traffic"] if labelled else full_tr,
        data["x_eval"],
        data["y_eval"] if labelled else full_ev,
        full_traffic=full_tr,
        full_eval=full_ev,
    )
    eo_args = SimpleNamespace(
        eo_splits=["holdout"],
        eo_hidden=args.eo_hidden,
        eo_epochs=args.eo_epochs,
        eo_lr=1e-3,
        eo_batch=64,
        eo_temperature="both",
        eo_drops=[],  # no calibration on labels: matched agreement only
        eo_pseudo_drops=[0.0, 0.005],
        eo_policies=["confidence", "entropy"],
        eo_grids=["default", "fine"],
        target=args.target,
        progress=args.progress,
    )
    start = time.perf_counter()
    eo_run = sbs.run_earlyon(eo, w, eem, names, stream, eo_args, seed)
    rows = []
    for r in sbs.earlyon_selection(eo_run["results"], goal, oracle):
        entry = r.pop("earlyon")
        check = sbs.verify_router(eo_run["trained"], entry, data["x_eval"], args.verify_samples)
        if check["exit_mismatches"] or not check["macs_match"]:
            log(f"  warning: earlyon's router disagrees with the replay for {r['method']}")
        rows.append(
            {
                "method": EARLYON_DEFAULTS if "defaults" in r["method"] else EARLYON_BEST,
                "setting": r["setting"],
                "mac_saving": r["mac_saving"],
                "agreement": r["agreement"],
                "agreement_exited": r["agreement_exited"],
                "exit_rate": r["exit_rate"],
                "accuracy_early": r["accuracy_early"] if labelled else None,
                "accuracy_full": r["accuracy_full"] if labelled else None,
                "meets_target": r["meets_target"],
                "hindsight": r.get("hindsight"),
                "settings_tried": r.get("settings_tried"),
                "router_check": check,
            }
        )
    return {
        "rows": rows,
        "version": eo.version,
        "trained_on": "labels" if labelled else "full-model answers",
        "simulation_mismatches": eo_run["simulation_mismatches"],
        "seconds": round(time.perf_counter() - start, 1),
    }


# ------------------------------------------------------------------------------------ one run


def run(name: str, seed: int, args: argparse.Namespace, eo: SimpleNamespace | None) -> dict:
    from earlyexit.evaluation.workloads import load_workload

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    w = load_workload(name, traffic_size=args.traffic_size, eval_size=args.eval_size, seed=seed)
    w.model.eval()
    log(f"[{w.name} seed {seed}] {w.description}")
    x_tr, y_tr = materialize(w.traffic)
    x_ev, y_ev = materialize(w.evaluation)
    data = {
        "x_traffic": x_tr,
        "y_traffic": y_tr,
        "x_eval": x_ev,
        "y_eval": y_ev,
        "traffic": as_data(x_tr, y_tr),  # labels ride along; no method but earlyon reads them
        "evaluation": as_data(x_ev, y_ev),
    }
    goal = sbs.Goal(args.target, args.agreement_on)
    notes: list[str] = []

    start = time.perf_counter()
    ours = run_ours(w, data, args, seed)
    seconds["ours"] = time.perf_counter() - start
    record = ours["record"]
    labels = record.labels
    accuracy_full = None if labels is None else float((record.final_pred == labels).double().mean())
    oracle = evaluate_exits(record, oracle_exits(record))
    log(
        f"  ours: MAC saving {ours['point'].mac_saving:.1%}, thresholds {list(ours['eem'].thresholds)}"
    )

    start = time.perf_counter()
    converged = run_converged(ours, data, args, seed)
    seconds["converged"] = time.perf_counter() - start

    start = time.perf_counter()
    recipe, recipe_point = run_recipe(w, ours, data, args, seed)
    seconds["recipe"] = time.perf_counter() - start
    log(f"  recipe: threshold {recipe.threshold:.4f}, MAC saving {recipe_point.mac_saving:.1%}")

    ours_figures = point_dict(ours["point"])
    converged_figures = point_dict(converged["point"])
    gap = goal.agreement(converged_figures) - goal.agreement(ours_figures)
    rows = [
        make_row(
            OURS,
            ours_figures,
            goal,
            accuracy_full,
            thresholds=list(ours["eem"].thresholds),
            first_saving_at=ours["first_saving_at"],
            first_saving_source=ours["first_saving_source"],
            learning_cost=ours["learning_cost"],
            converged_agreement=goal.agreement(converged_figures),
            converged_gap=gap,
            within_one_point_of_converged=gap <= 0.01,
        ),
        make_row(RECIPE, point_dict(recipe_point), goal, accuracy_full, recipe=recipe.to_dict()),
        make_row(
            CONVERGED,
            converged_figures,
            goal,
            accuracy_full,
            epochs=args.converge_epochs,
            loss_final=converged["loss_final"],
            loss_drop_last_fifth=converged["loss_drop_last_fifth"],
        ),
    ]
    earlyon_info: dict[str, Any] | None = None
    if args.no_earlyon:
        notes.append("earlyon skipped (--no-earlyon)")
    elif eo is None:
        notes.append(f"earlyon is not installed, its rows are skipped ({sbs.INSTALL_HINT})")
    else:
        start = time.perf_counter()
        earlyon_info = run_earlyon(eo, w, ours, data, args, seed, goal, oracle.mac_saving)
        seconds["earlyon"] = time.perf_counter() - start
        rows += earlyon_info.pop("rows")
    rows.append(make_row(ORACLE, point_dict(oracle), goal, accuracy_full))

    by_method = {r["method"]: r for r in rows}
    ours_row, recipe_row = by_method[OURS], by_method[RECIPE]
    earlyon_rows = [r for r in rows if r["method"] in (EARLYON_DEFAULTS, EARLYON_BEST)]
    meeting = [r for r in earlyon_rows if r["meets_target"]]
    earlyon_ref = (
        max(meeting, key=lambda r: r["mac_saving"]) if meeting else by_method.get(EARLYON_DEFAULTS)
    )
    verdict = {
        "agreement_ok": ours_row["meets_target"],
        "saving_ge_recipe": ours_row["mac_saving"] >= recipe_row["mac_saving"],
        "recipe_meets_target": recipe_row["meets_target"],
        "saving_ge_earlyon": None
        if earlyon_ref is None
        else ours_row["mac_saving"] >= earlyon_ref["mac_saving"],
        "earlyon_reference": None if earlyon_ref is None else earlyon_ref["method"],
        "within_one_point_of_converged": ours_row["within_one_point_of_converged"],
    }
    verdict["meets"] = bool(
        verdict["agreement_ok"]
        and verdict["saving_ge_recipe"]
        and verdict["saving_ge_earlyon"] is not False
    )
    if verdict["saving_ge_earlyon"] is None:
        notes.append("verdict without earlyon: only the recipe was compared")
    seconds["total"] = time.perf_counter() - t_start
    return {
        "workload": w.name,
        "description": w.description,
        "seed": seed,
        "target_agreement": args.target,
        "target_on": args.agreement_on,
        "confidence": args.confidence,
        "traffic_samples": int(x_tr.shape[0]),
        "eval_samples": int(x_ev.shape[0]),
        "labelled": labels is not None,
        "base_macs": ours["eem"].base_macs,
        "exits": [
            {"name": e.name, "backbone_macs": b, "our_head_macs": h, "our_head_kind": k}
            for e, b, h, k in zip(
                ours["eem"].exits,
                ours["eem"].backbone_macs,
                ours["eem"].head_macs,
                ours["eem"].head_kinds,
                strict=True,
            )
        ],
        "rows": rows,
        "verdict": verdict,
        "config": ours["config"].to_dict(),
        "learner": {
            k: ours["stats"].get(k)
            for k in (
                "samples",
                "phase",
                "train_steps",
                "calibrations",
                "learning_cost",
                "head_choice",
                "learner_only",
            )
        },
        "earlyon": earlyon_info,
        "notes": notes,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }


# ------------------------------------------------------------------------------------ output


def _pct(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def markdown_table(result: dict[str, Any]) -> str:
    lines = [
        f"### {result['workload']}, seed {result['seed']}: target agreement "
        f">= {result['target_agreement']:g} ({result['target_on']}), "
        f"{result['traffic_samples']} traffic / {result['eval_samples']} held-out samples",
        "",
        "| method | MAC saving | agreement (all) | agreement (exited) | exit rate | acc. full "
        "| acc. early | meets target |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {_pct(r['mac_saving'])} | {_pct(r['agreement'], 2)} "
            f"| {_pct(r['agreement_exited'], 2)} | {_pct(r['exit_rate'])} "
            f"| {_pct(r['accuracy_full'], 2)} | {_pct(r['accuracy_early'], 2)} "
            f"| {'yes' if r['meets_target'] else 'no'} |"
        )
    ours = result["rows"][0]
    v = result["verdict"]
    cost = ours["learning_cost"]
    lines += [
        "",
        f"- ours: first early exit after {ours['first_saving_at']} samples served "
        f"({ours['first_saving_source']}); learning cost: "
        + ("not reported by the learner" if cost is None else json.dumps(cost))
        + f"; offline-converged heads at our thresholds: agreement {_pct(ours['converged_agreement'], 2)}"
        f" ({'within' if ours['within_one_point_of_converged'] else 'NOT within'} one point: "
        f"gap {100 * ours['converged_gap']:+.2f} points)",
        f"- recipe threshold {result['rows'][1]['recipe']['threshold']:.4f}, calibrated on the "
        f"last {result['rows'][1]['recipe']['calibration_samples']} traffic samples",
        f"- verdict: agreement ok {v['agreement_ok']}, saving >= recipe {v['saving_ge_recipe']}, "
        f"saving >= earlyon {v['saving_ge_earlyon']} ({v['earlyon_reference'] or 'no earlyon'}): "
        f"**{'meets' if v['meets'] else 'does not meet'}**",
        *[f"- note: {n}" for n in result["notes"]],
    ]
    return "\n".join(lines)


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, min and max over seeds of every row's figures, per method; verdict counts."""
    methods: dict[str, dict[str, list[float]]] = {}
    for result in results:
        for r in result["rows"]:
            keys = (*ROW_NUMBERS, "first_saving_at", "converged_gap")
            for key in keys:
                if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool):
                    methods.setdefault(r["method"], {}).setdefault(key, []).append(float(r[key]))
    stats = {
        method: {
            key: {"mean": sum(vs) / len(vs), "min": min(vs), "max": max(vs), "n": len(vs)}
            for key, vs in values.items()
        }
        for method, values in methods.items()
    }
    return {
        "seeds": [r["seed"] for r in results],
        "methods": stats,
        "meets": sum(bool(r["verdict"]["meets"]) for r in results),
        "runs": len(results),
    }


def summary_table(workload: str, stats: dict[str, Any]) -> str:
    lines = [
        f"### {workload}: mean [min, max] over seeds {stats['seeds']}; ours meets the target in "
        f"{stats['meets']} of {stats['runs']}",
        "",
        "| method | MAC saving | agreement (all) | agreement (exited) |",
        "|---|---:|---:|---:|",
    ]

    def cell(s: dict | None, digits: int) -> str:
        if s is None:
            return "-"
        return f"{_pct(s['mean'], digits)} [{_pct(s['min'], digits)}, {_pct(s['max'], digits)}]"

    for method, figures in stats["methods"].items():
        lines.append(
            f"| {method} | {cell(figures.get('mac_saving'), 1)} "
            f"| {cell(figures.get('agreement'), 2)} | {cell(figures.get('agreement_exited'), 2)} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\nExample:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:" + __doc__.split("\n\nExample:")[1],
    )
    parser.add_argument(
        "--workload",
        nargs="+",
        default=["digits"],
        help="one or more workload names load_workload knows (default digits)",
    )
    parser.add_argument(
        "--seed", type=int, nargs="+", default=[0], help="one or more seeds (default 0)"
    )
    parser.add_argument(
        "--traffic-size", type=int, default=None, metavar="N", help="traffic samples"
    )
    parser.add_argument("--eval-size", type=int, default=None, metavar="N", help="held-out samples")
    parser.add_argument("--target", type=float, default=0.99, help="agreement target (0.99)")
    parser.add_argument(
        "--confidence", type=float, default=0.95, help="our calibration's confidence (0.95)"
    )
    parser.add_argument(
        "--agreement-on",
        choices=("exited", "all"),
        default="exited",
        help="where the target must hold on the held-out split, and what the recipe calibrates: "
        "among early exits (default; our calibration's meaning) or over all samples",
    )
    parser.add_argument("--batch", type=int, default=32, help="serving batch size (32)")
    parser.add_argument(
        "--head",
        default=None,
        help="our head kind, or auto (places and kinds chosen on the first 2048 samples; "
        "default: the pipeline's, as the demo)",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a DistillConfig field for ours, e.g. --config guarantee=expected "
        "(repeatable; JSON values, else strings; none = null)",
    )
    recipe = parser.add_argument_group("offline yardsticks")
    recipe.add_argument("--recipe-epochs", type=int, default=15, help="recipe epochs (15)")
    recipe.add_argument(
        "--calibration-share",
        type=float,
        default=0.25,
        help="the recipe's calibration split: this last share of the traffic (0.25)",
    )
    recipe.add_argument(
        "--converge-epochs",
        type=int,
        default=None,
        help="epochs for our heads offline to convergence (default 40; --quick 8)",
    )
    eo = parser.add_argument_group("earlyon")
    eo.add_argument("--no-earlyon", action="store_true", help="skip earlyon's rows")
    eo.add_argument(
        "--eo-hidden", type=int, nargs="+", default=[128], help="head widths swept (128)"
    )
    eo.add_argument(
        "--eo-epochs",
        type=int,
        nargs="+",
        default=None,
        help="stage-2 epochs swept, one run with snapshots (default 5 20; --quick 5)",
    )
    eo.add_argument(
        "--verify-samples",
        type=int,
        default=200,
        metavar="N",
        help="held-out samples served through earlyon's real router per row (200)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 600 traffic / 300 held-out samples, 8 convergence epochs, earlyon 5 "
        "epochs (unless given explicitly)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (use 1)")
    parser.add_argument("--out", default=None, metavar="DIR", help=f"JSON folder ({RESULTS})")
    parser.add_argument("--quiet", dest="progress", action="store_false", help="less on stderr")
    args = parser.parse_args(argv)
    for name, full, quick in (
        ("traffic_size", None, 600),
        ("eval_size", None, 300),
        ("converge_epochs", 40, 8),
        ("eo_epochs", [5, 20], [5]),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if not 0.0 < args.target < 1.0:
        parser.error("--target must be in (0, 1)")
    if not 0.0 < args.calibration_share <= 1.0:
        parser.error("--calibration-share must be in (0, 1]")
    if args.recipe_epochs < 1 or args.converge_epochs < 1:
        parser.error("--recipe-epochs and --converge-epochs must be >= 1")
    try:  # a malformed key=value or an unknown or invalid field fails before any work
        PipelineOptions(distill=parse_config(args.config)).distill_config()
    except (TypeError, ValueError) as error:
        parser.error(f"--config: {error}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    eo = None if args.no_earlyon else sbs.import_earlyon()
    if eo is None and not args.no_earlyon:
        log(f"earlyon is not installed; its rows are skipped ({sbs.INSTALL_HINT})")
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    out_dir = Path(args.out) if args.out else RESULTS
    for name in dict.fromkeys(args.workload):
        results = [run(name, seed, args, eo) for seed in dict.fromkeys(args.seed)]
        for result in results:
            print(markdown_table(result) + "\n", flush=True)
        stats = summary(results)
        print(summary_table(name, stats) + "\n", flush=True)
        path = out_dir / (
            f"savings_{name}_{args.head}.json" if args.head else f"savings_{name}.json"
        )
        sbs.write_json(path, {"workload": name, "runs": results, "summary": stats})
        log(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
