"""Side by side on one workload and one stream: earlyexit's label-free online exits, an SDN-style
baseline trained with labels, and the peer library earlyon (``earlyon==0.3.0``).

Same backbone, same exit modules, same traffic split to learn from, same held-out evaluation split,
one MAC accounting (earlyexit's: torchvision's convention, heads evaluated on the way included):

1. **ours**: ``earlyexit.pipeline.serve_and_evaluate`` (what ``earlyexit demo`` runs) serves the
   traffic while its heads learn online by self-distillation, never seeing a label, and calibrates
   thresholds online (agreement with the full model >= ``--target`` among early exits, at 95%
   confidence). Read from its report: our calibrated operating point, the SDN baseline (copies of our
   heads trained offline with the traffic's labels, scored by our gate) at its calibrated point
   (``calibrate_greedy`` on the traffic split) and at its best threshold-sweep point with agreement >= ``--target``
   (chosen in hindsight on the evaluation split), and the oracle (each sample leaves at the first
   of our heads that agrees with the full model).
2. **earlyon**: ``earlyon.models.custom_ee`` hooks its exit heads (pool -> MLP) onto a copy of the
   same backbone at the same module names; ``earlyon.training.stage2_train_exits`` trains them with
   labels on the frozen backbone; ``earlyon.core.thresholds.calibrate_thresholds`` picks per-exit
   thresholds for a target accuracy drop. Calibrated twice: on the labels (its native mode) and on
   the full model's answers (pseudo-labels, drop = 1 - ``--target``: agreement matched to ours).
   Its settings are swept (head width, epochs, calibration split, routing policy, temperature
   scaling, threshold grid, target drop); rows show its README defaults and its best setting that
   reaches agreement >= ``--target`` on the evaluation split (chosen in hindsight, which favours it).
   Cost: per held-out sample, the exit earlyon's router lets it leave at; path MACs = backbone MACs
   up to that exit (``eem.backbone_macs``) + every enabled earlyon head on the way (counted with
   ``earlyexit.evaluation.count_macs``); the full model costs ``eem.base_macs`` + every enabled head.
   The exits come from replaying earlyon's routing rule on cached head logits (checked against its
   own ``simulate_policy`` for every setting, and against its real batch-1 router, with MACs counted
   while it runs, for the reported rows).

A point meets the target when its agreement with the full model over all held-out samples reaches
``--target`` (as the report's sweeps count it); ``--agreement-on exited`` counts it among the samples
that left early instead, the stronger figure our online calibration guarantees.

earlyon is never a dependency of earlyexit: it is imported lazily; without it its rows are skipped
(``--require-earlyon``: exit 2). Install it next to the pinned torch without touching it:
``pip install --no-deps earlyon==0.3.0`` (its requirements, torch, torchvision, click, numpy and
fvcore, are already there; ``pip check`` stays clean).

Prints a Markdown table per seed and writes ``benchmarks/results/side_by_side_<workload>_seed<k>.json``.
Runtime, one CPU thread: digits at its default sizes (4000 / 2000) with the full earlyon sweep (672
settings) about 11 minutes, nine tenths of it earlyon's stage-2 training, which runs the whole
backbone every epoch; narrow the sweep (``--quick``, ``--eo-*``) for the larger workloads. On a
machine shared with another job pass ``--threads 1``: oversubscribed threads are far slower.

Example:
    python benchmarks/side_by_side.py --workload digits --traffic-size 1000 --eval-size 500
    python benchmarks/side_by_side.py --workload fashion --seed 0 1 2
    python benchmarks/side_by_side.py --workload digits --quick --json > side_by_side.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import itertools
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from earlyexit.costs.macs import MacCounter, count_macs
from earlyexit.evaluation.baselines import (
    METHOD_OPERATING,
    METHOD_ORACLE,
    METHOD_SDN,
    METHOD_SDN_OPERATING,
    METHOD_SWEEP,
)
from earlyexit.evaluation.stream import iterate_batches
from earlyexit.model import exit_path_macs

RESULTS = Path(__file__).resolve().parent / "results"
EARLYON_PIN = "earlyon==0.3.0"
# --no-deps: its requirements (torch, torchvision, click, numpy, fvcore) are ours already, and a
# resolver must not get the chance to move the pinned torch.
INSTALL_HINT = (
    f"pip install {EARLYON_PIN} (next to a pinned torch: pip install --no-deps {EARLYON_PIN})"
)
EXIT_NO_EARLYON = 2
# earlyon's README defaults: 128-unit MLP heads, stage-2 default of 20 epochs, confidence routing,
# no temperature scaling, its own threshold grid, a 1% accuracy budget on a held-out split.
EARLYON_DEFAULT = {
    "hidden": 128,
    "epochs": 20,
    "split": "holdout",
    "policy": "confidence",
    "temperature": False,
    "grid": "default",
}
EARLYON_DEFAULT_DROP = 0.01
# The "fine" grids add conservative values to earlyon's own (confidence 0.99 ... 0.5): its most
# conservative threshold, 0.99, is often too loose for 99% agreement at an early exit, which then
# stays disabled.
FINE_CONFIDENCE_EXTRA = (0.9999, 0.9995, 0.999, 0.998, 0.995, 0.98, 0.97)
FINE_ENTROPY_EXTRA = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02)  # fractions of ln(num_classes)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ earlyon


def import_earlyon() -> SimpleNamespace | None:
    """The pieces of earlyon this benchmark uses, or ``None`` when it is not installed.

    Imported here, never at module level: earlyon is a benchmark peer, not a dependency.
    """
    try:
        earlyon = importlib.import_module("earlyon")
        thresholds = importlib.import_module("earlyon.core.thresholds")
        models = importlib.import_module("earlyon.models")
        training = importlib.import_module("earlyon.training")
    except ImportError:
        return None
    version = getattr(earlyon, "__version__", "?")
    if version != EARLYON_PIN.split("==")[1]:
        log(f"warning: earlyon {version} installed; this benchmark was written for {EARLYON_PIN}")
    return SimpleNamespace(
        version=version,
        custom_ee=models.custom_ee,
        stage2_train_exits=training.stage2_train_exits,
        calibrate_thresholds=thresholds.calibrate_thresholds,
        collect_head_logits=thresholds.collect_head_logits,
        simulate_policy=thresholds.simulate_policy,
        thresholds_module=thresholds,
        default_grid=thresholds.DEFAULT_GRID,
        default_entropy_fractions=thresholds.DEFAULT_ENTROPY_FRACTIONS,
    )


@dataclass(frozen=True)
class EarlyonSetting:
    """One earlyon configuration: how the heads were trained and how thresholds were calibrated."""

    hidden: int  # EarlyExitHead hidden width
    epochs: int  # stage-2 epochs on the frozen backbone
    split: str  # "holdout": train 70% / calibrate 30% of traffic; "all": both on all of it
    policy: str  # "confidence" or "entropy" routing
    temperature: bool  # per-head temperature scaling before the threshold search
    grid: str  # "default" (earlyon's) or "fine"
    targets: str  # calibrated on "labels" or on the "full model"'s answers
    drop: float  # target_accuracy_drop

    def describe(self) -> str:
        cal = "labels" if self.targets == "labels" else "full-model answers"
        return (
            f"MLP-{self.hidden} heads, {self.epochs} ep; {self.split} split; {self.policy}, "
            f"T {'fit' if self.temperature else 'off'}, {self.grid} grid; "
            f"drop {self.drop:g} on {cal}"
        )

    def is_default(self) -> bool:
        return all(getattr(self, k) == v for k, v in EARLYON_DEFAULT.items())


@contextlib.contextmanager
def reuse_head_logits(eo: SimpleNamespace) -> Iterator[None]:
    """Within the block, earlyon's calibration reuses the head logits it collected per loader.

    ``calibrate_thresholds`` reruns the backbone over its loader on every call, though raw logits
    depend on neither thresholds nor temperatures; with dozens of settings per trained snapshot
    that would dominate the run. Its search code is untouched. Use one block per head snapshot.
    """
    module = eo.thresholds_module
    original = module.collect_head_logits
    cache: dict[int, Any] = {}
    keep: list[Any] = []  # loaders stay alive, so their ids are not reused inside the block

    def collect(model: nn.Module, loader: Any, device: str) -> Any:
        key = id(loader)
        if key not in cache:
            cache[key] = original(model, loader, device)
            keep.append(loader)
        return cache[key]

    module.collect_head_logits = collect
    try:
        yield
    finally:
        module.collect_head_logits = original


def route(cache: Any, config: Any) -> Tensor:
    """Per sample, the path earlyon's router takes (``0..E-1`` an exit, ``E`` the full model).

    The router's rule replayed on cached logits: per-head temperature, softmax, confidence >= or
    entropy <= the exit's threshold, the first *enabled* exit that fires answers.
    """
    n_exits = len(config.exit_points)
    chosen = torch.full((cache.num_samples,), n_exits, dtype=torch.long)
    for i in range(n_exits - 1, -1, -1):  # earlier exits override later ones
        if not config.enabled_exits[i]:
            continue
        temp = config.temperatures[config.exit_points[i].name]
        probs = torch.softmax(cache.logits[i] / temp, dim=-1)
        if config.routing_policy == "confidence":
            fires = probs.max(dim=-1).values.double() >= config.confidence_thresholds[i]
        else:
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
            fires = entropy.double() <= config.entropy_thresholds[i]
        chosen[fires] = i
    return chosen


def snapshot_config(config: Any) -> dict[str, Any]:
    return {
        "routing_policy": config.routing_policy,
        "confidence_thresholds": list(config.confidence_thresholds),
        "entropy_thresholds": list(config.entropy_thresholds),
        "enabled_exits": list(config.enabled_exits),
        "temperatures": dict(config.temperatures),
    }


def restore_config(config: Any, saved: dict[str, Any]) -> None:
    for key, value in saved.items():
        setattr(config, key, copy.deepcopy(value))
    config.validate()


def reset_config(config: Any, policy: str) -> None:
    """A clean slate per setting, earlyon's construction defaults: calibration rewrites the
    thresholds of its own policy and the enablement, but temperatures only when it fits them."""
    n = len(config.exit_points)
    config.routing_policy = policy
    config.confidence_thresholds = [0.8] * n
    config.entropy_thresholds = [0.5 * math.log(max(config.num_classes, 2))] * n
    config.enabled_exits = [True] * n
    config.temperatures = {name: 1.0 for name in config.temperatures}
    config.validate()


# ------------------------------------------------------------------------------------ figures


def exited_agreement(exit_rates: Sequence[float], exit_agreement: Sequence[float | None]) -> float:
    """Agreement with the full model among the samples that left early (1.0 if none did)."""
    pairs = [(r, a) for r, a in zip(exit_rates[:-1], exit_agreement[:-1], strict=True) if r]
    left = sum(r for r, _ in pairs)
    return sum(r * (a or 0.0) for r, a in pairs) / left if left else 1.0


@dataclass(frozen=True)
class Goal:
    """The agreement with the full model a policy must reach on the evaluation split."""

    level: float
    on: str  # "all": over every sample; "exited": among the samples that left early

    def agreement(self, point: dict[str, Any]) -> float:
        if self.on == "all":
            return point["agreement"]
        if point.get("agreement_exited") is not None:
            return point["agreement_exited"]
        return exited_agreement(point["exit_rates"], point["exit_agreement"])

    def met(self, point: dict[str, Any]) -> bool:
        return self.agreement(point) >= self.level

    def describe(self) -> str:
        return f"agreement >= {self.level:g} " + (
            "over all samples" if self.on == "all" else "among early exits"
        )


def figures(
    path: Tensor, preds: Tensor, final: Tensor, labels: Tensor, costs: Sequence[int], base: int
) -> dict[str, Any]:
    """Cost and quality of a policy from the path each sample took and the answer it got."""
    n_paths = len(costs)
    agree = preds == final
    counts = torch.bincount(path, minlength=n_paths)
    rates = (counts.double() / path.numel()).tolist()
    per_path = [
        float(agree[path == p].double().mean()) if counts[p] else None for p in range(n_paths)
    ]
    mean_macs = float(torch.tensor(costs, dtype=torch.float64)[path].mean())
    return {
        "mac_saving": 1.0 - mean_macs / base,
        "expected_macs": mean_macs,
        "agreement": float(agree.double().mean()),
        "agreement_exited": exited_agreement(rates, per_path),
        "exit_rate": 1.0 - rates[-1],
        "accuracy_early": float((preds == labels).double().mean()),
        "accuracy_full": float((final == labels).double().mean()),
        "exit_rates": rates,
        "exit_agreement": per_path,
    }


def heads_oracle_saving(preds: Tensor, final: Tensor, eem: Any, head_macs: Sequence[int]) -> float:
    """Saving of the oracle on some heads: each sample leaves at the first head agreeing with the
    full model (``preds``: ``[E + 1, N]``, the last row the full model's), every head on the way
    evaluated, as the report's oracle does for ours."""
    agree = torch.cat([preds[:-1] == final, torch.ones_like(final, dtype=torch.bool)[None]])
    path = agree.int().argmax(dim=0)  # first True
    costs = exit_path_macs(eem.backbone_macs, head_macs, eem.base_macs, [True] * len(head_macs))
    return 1.0 - float(torch.tensor(costs, dtype=torch.float64)[path].mean()) / eem.base_macs


def row(
    method: str,
    setting: str,
    point: dict[str, Any],
    oracle: float,
    goal: Goal,
    *,
    heads_oracle: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One table row (every figure on the held-out evaluation split).

    ``oracle``: the saving of the oracle on our online heads (the report's), which every row's
    share is taken of; ``heads_oracle``: the oracle on the row's own heads, where known.
    """
    agreement_exited = point.get("agreement_exited")
    if agreement_exited is None and "exit_rates" in point:
        agreement_exited = exited_agreement(point["exit_rates"], point["exit_agreement"])
    return {
        "method": method,
        "setting": setting,
        "mac_saving": point["mac_saving"],
        "agreement": point["agreement"],
        "agreement_exited": agreement_exited,
        "exit_rate": 1.0 - point["exit_rates"][-1] if "exit_rates" in point else None,
        "accuracy_early": point.get("accuracy_early", point.get("accuracy")),
        "accuracy_full": point.get("accuracy_full"),
        "share_of_oracle": point["mac_saving"] / oracle if oracle > 0 else None,
        "heads_oracle_saving": heads_oracle,
        "meets_target": goal.met({**point, "agreement_exited": agreement_exited}),
        **extra,
    }


# ------------------------------------------------------------------------------------ data


def materialize(dataset: Any, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Render a labelled split once, so both libraries see the very same tensors in one order."""
    xs, ys = [], []
    for x, y in iterate_batches(dataset, batch_size=batch_size):
        if y is None:
            raise SystemExit("this benchmark needs a labelled workload (earlyon trains on labels)")
        xs.append(x)
        ys.append(y.long())
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def full_model_logits(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def feature_shapes(model: nn.Module, names: Sequence[str], input_size: Sequence[int]) -> list:
    """Per-sample shape of each exit module's output (what an earlyon head reads)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def keep(name: str):
        def hook(_module: nn.Module, _args: Any, out: Tensor) -> None:  # None: output unchanged
            shapes[name] = tuple(out.shape[1:])

        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        model(torch.zeros(1, *input_size))
    finally:
        for h in handles:
            h.remove()
    return [shapes[n] for n in names]


def loader(x: Tensor, y: Tensor, *, batch_size: int, shuffle: bool = False, seed: int = 0):
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator
    )


# ------------------------------------------------------------------------------------ ours


def run_ours(w: Any, traffic: Any, evaluation: Any, args: argparse.Namespace, seed: int):
    """Our pipeline as ``earlyexit demo`` runs it, with the SDN baseline and without latency."""
    from earlyexit.evaluation.pipeline import PipelineOptions, serve_and_evaluate

    options = PipelineOptions(
        target_agreement=args.target,
        sdn_baseline=True,
        latency=False,
        seed=seed,
        progress=args.progress,
        **({"head": args.head} if args.head else {}),  # else the pipeline's default, as the demo
    )
    # Its report files are not needed here: the figures go into this benchmark's JSON.
    with tempfile.TemporaryDirectory() as out_dir:
        result = serve_and_evaluate(
            copy.deepcopy(w.model),  # earlyon gets its own copy: no hooks shared
            traffic,
            evaluation,
            labelled=True,
            out_dir=out_dir,
            name=f"side_by_side_{w.name}",
            model_name=w.name,
            stream_meta={"workload": w.name, "description": w.description},
            options=options,
            input_size=w.input_size,
            log=log if args.progress else lambda _m: None,
        )
    return result.report, result.learner.eem, result.seconds


def ours_rows(report: dict[str, Any], goal: Goal) -> tuple[list[dict[str, Any]], float]:
    points, curves = report["points"], report["curves"]
    oracle = report["oracle_mac_saving"]
    thresholds = ", ".join(
        "closed" if t in ("inf", math.inf) else f"{float(t):.3f}" for t in report["thresholds"]
    )
    head = report["model"].get("head_kind", "?")
    rows = [
        row(
            "ours: online, label-free",
            f"{head} heads; calibrated online (agreement >= {goal.level:g} among exits, "
            f"95% conf.); thresholds [{thresholds}]",
            {
                **points[METHOD_OPERATING],
                "accuracy_early": report["accuracy_early"],
                "accuracy_full": report["accuracy_full"],
            },
            oracle,
            goal,
            key="ours",
            heads_oracle=oracle,
            hindsight=False,
        )
    ]
    best = _best_on_curve(curves.get(METHOD_SWEEP, []), goal)
    if best is not None:
        rows.append(
            row(
                "ours: online heads, best sweep point",
                f"shared threshold {float(best['param']):.4g} (hindsight on evaluation)",
                {**best, "accuracy_full": report["accuracy_full"]},
                oracle,
                goal,
                key="ours_best_sweep",
                heads_oracle=oracle,
                hindsight=True,
            )
        )
    if METHOD_SDN_OPERATING in points:
        rows.append(
            row(
                "SDN: heads trained with labels",
                f"copies of our {head} heads, 30 epochs of cross-entropy on the traffic labels "
                "(offline); "
                f"calibrate_greedy at {goal.level:g} on the traffic split",
                {**points[METHOD_SDN_OPERATING], "accuracy_full": report["accuracy_full"]},
                oracle,
                goal,
                key="sdn",
                hindsight=False,
            )
        )
    best = _best_on_curve(curves.get(METHOD_SDN, []), goal)
    rows.append(
        row(
            "SDN: best sweep point",
            "none reaches the target"
            if best is None
            else f"shared threshold {float(best['param']):.4g} (hindsight on evaluation)",
            {
                **(best or _most_agreeing(curves.get(METHOD_SDN, []), goal)),
                "accuracy_full": report["accuracy_full"],
            },
            oracle,
            goal,
            key="sdn_best_sweep",
            hindsight=True,
        )
    )
    rows.append(
        row(
            "oracle (our heads)",
            "first head agreeing with the full model; heads on the way counted",
            {**points[METHOD_ORACLE], "accuracy_full": report["accuracy_full"]},
            oracle,
            goal,
            key="oracle",
            heads_oracle=oracle,
            hindsight=True,
        )
    )
    return rows, oracle


def _best_on_curve(points: Sequence[dict[str, Any]], goal: Goal) -> dict[str, Any] | None:
    ok = [p for p in points if goal.met(p)]
    return max(ok, key=lambda p: p["mac_saving"]) if ok else None


def _most_agreeing(points: Sequence[dict[str, Any]], goal: Goal) -> dict[str, Any]:
    return max(points, key=lambda p: (goal.agreement(p), p["mac_saving"]))


# ------------------------------------------------------------------------------------ earlyon run


def _splits(n: int, mode: str, temperature: bool) -> tuple[slice, slice | None, slice]:
    """(train, temperature, calibration) parts of the traffic split, in stream order.

    ``holdout`` follows earlyon's split discipline: heads train on the first 70%; the last 30% is
    the calibration split, cut in half when temperatures are fitted (first half fits them). ``all``
    trains, fits and calibrates on the whole traffic split, as the report's SDN baseline does.
    """
    if mode == "all":
        return slice(0, n), (slice(0, n) if temperature else None), slice(0, n)
    cut = round(0.7 * n)
    if not temperature:
        return slice(0, cut), None, slice(cut, n)
    mid = cut + (n - cut) // 2
    return slice(0, cut), slice(cut, mid), slice(mid, n)


def _grid(eo: SimpleNamespace, name: str, policy: str, num_classes: int) -> tuple[float, ...]:
    """A threshold grid in earlyon's order: conservative first (it keeps the last that passes)."""
    if policy == "confidence":
        extra = () if name == "default" else FINE_CONFIDENCE_EXTRA
        return tuple(sorted({*eo.default_grid, *extra}, reverse=True))
    extra = () if name == "default" else FINE_ENTROPY_EXTRA
    h_max = math.log(max(num_classes, 2))
    return tuple(round(f * h_max, 6) for f in sorted({*eo.default_entropy_fractions, *extra}))


def train_snapshots(
    eo: SimpleNamespace,
    wrapper: nn.Module,
    train: DataLoader,
    epochs: Sequence[int],
    lr: float,
    progress: bool,
) -> dict[int, dict[str, Tensor]]:
    """earlyon's stage-2 training for ``max(epochs)`` epochs, heads saved after each of ``epochs``.

    Stage 2 uses Adam at a constant learning rate, so the state after ``k`` epochs of a longer run
    is exactly that of a ``k``-epoch run: one run serves every epoch setting.
    """
    wanted = set(epochs)
    saved: dict[int, dict[str, Tensor]] = {}

    def on_epoch_end(entry: Any) -> None:
        done = entry.epoch + 1
        if progress:
            per_exit = " ".join(f"{k}={v:.3f}" for k, v in (entry.per_exit_accuracy or {}).items())
            log(f"    epoch {done}: loss {entry.loss:.4f} train acc {per_exit}")
        if done in wanted:
            saved[done] = copy.deepcopy(wrapper.exit_heads.state_dict())

    eo.stage2_train_exits(wrapper, train, epochs=max(epochs), lr=lr, on_epoch_end=on_epoch_end)
    wrapper.eval()  # stage 2 leaves the heads in train mode (dropout)
    return saved


@dataclass
class Stream:
    """The split tensors both libraries see, plus the full model's answers on them."""

    x_traffic: Tensor
    y_traffic: Tensor
    x_eval: Tensor
    y_eval: Tensor
    full_traffic: Tensor  # full-model argmax: earlyon's pseudo-labels
    full_eval: Tensor


@dataclass
class TrainedHeads:
    """One earlyon wrapper (one split and head width) and its head snapshots by epoch."""

    wrapper: nn.Module
    snapshots: dict[int, dict[str, Tensor]]
    head_macs: list[int]
    train_seconds: float


def train_earlyon(
    eo: SimpleNamespace,
    w: Any,
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    stream: Stream,
    split: str,
    hidden: int,
    args: argparse.Namespace,
    seed: int,
) -> TrainedHeads:
    """earlyon's heads on a copy of the backbone, at our exit modules, trained with labels."""
    start = time.perf_counter()
    torch.manual_seed(seed)  # head initialisation
    wrapper = eo.custom_ee(
        copy.deepcopy(w.model),
        list(names),
        w.num_classes,
        input_shape=(1, *w.input_size),
        hidden_dim=hidden,
    )
    wrapper.eval()
    head_macs = [
        count_macs(wrapper.exit_heads[ep.name], (1, *shape))
        for ep, shape in zip(wrapper.config.exit_points, shapes, strict=True)
    ]
    # Temperatures never touch the training part, so one cut serves both variants.
    part = _splits(stream.x_traffic.shape[0], split, temperature=False)[0]
    log(
        f"  earlyon: MLP-{hidden} heads, {split} split: training on "
        f"{part.stop - part.start} traffic samples, {max(args.eo_epochs)} epochs ..."
    )
    train = loader(
        stream.x_traffic[part],
        stream.y_traffic[part],
        batch_size=args.eo_batch,
        shuffle=True,
        seed=seed,
    )
    snapshots = train_snapshots(eo, wrapper, train, args.eo_epochs, args.eo_lr, args.progress)
    return TrainedHeads(wrapper, snapshots, head_macs, time.perf_counter() - start)


def calibrate_snapshot(
    eo: SimpleNamespace,
    heads: TrainedHeads,
    epochs: int,
    split: str,
    hidden: int,
    stream: Stream,
    eem: Any,
    args: argparse.Namespace,
    num_classes: int,
) -> list[dict[str, Any]]:
    """Every calibration setting of one head snapshot, each measured on the evaluation split."""
    wrapper = heads.wrapper
    wrapper.exit_heads.load_state_dict(heads.snapshots[epochs])
    eval_cache = eo.collect_head_logits(
        wrapper, loader(stream.x_eval, stream.y_eval, batch_size=256), "cpu"
    )
    # Row E is the final head: path index E (the full model) picks it.
    eval_preds = torch.stack([logits.argmax(dim=-1) for logits in eval_cache.logits])
    rows = torch.arange(stream.x_eval.shape[0])
    oracle = heads_oracle_saving(eval_preds, stream.full_eval, eem, heads.head_macs)
    n = stream.x_traffic.shape[0]
    temperatures = {"off": [False], "on": [True], "both": [False, True]}[args.eo_temperature]
    drops = {
        "labels": sorted(set(args.eo_drops)),
        "full model": sorted({*args.eo_pseudo_drops, round(1.0 - args.target, 6)}),
    }
    # Loaders are built once per snapshot so the logits cache (keyed by loader) is reused.
    loaders: dict[tuple[str, bool], tuple[DataLoader, DataLoader | None]] = {}
    for targets, y in (("labels", stream.y_traffic), ("full model", stream.full_traffic)):
        for temperature in temperatures:
            _, temp_part, cal_part = _splits(n, split, temperature)
            temp_loader = None
            if temp_part is not None:
                temp_loader = loader(stream.x_traffic[temp_part], y[temp_part], batch_size=256)
            cal_loader = loader(stream.x_traffic[cal_part], y[cal_part], batch_size=256)
            loaders[(targets, temperature)] = (cal_loader, temp_loader)

    results = []
    with reuse_head_logits(eo):
        for (targets, temperature), (cal, temp) in loaders.items():
            for policy, grid_name, drop in itertools.product(
                args.eo_policies, args.eo_grids, drops[targets]
            ):
                setting = EarlyonSetting(
                    hidden, epochs, split, policy, temperature, grid_name, targets, drop
                )
                reset_config(wrapper.config, policy)
                calibration = eo.calibrate_thresholds(
                    wrapper,
                    cal,
                    target_accuracy_drop=drop,
                    grid=_grid(eo, grid_name, policy, num_classes),
                    fit_temperature=temperature,
                    temperature_loader=temp,
                )
                path = route(eval_cache, wrapper.config)
                costs = exit_path_macs(
                    eem.backbone_macs, heads.head_macs, eem.base_macs, wrapper.config.enabled_exits
                )
                preds = eval_preds[path, rows]
                point = figures(path, preds, stream.full_eval, stream.y_eval, costs, eem.base_macs)
                # earlyon's own simulation of its router must agree with our replay.
                sim = eo.simulate_policy(eval_cache, wrapper)
                results.append(
                    {
                        "setting": asdict(setting),
                        "config": snapshot_config(wrapper.config),
                        "calibration_split": {
                            "samples": calibration.num_samples,
                            "baseline_accuracy": calibration.baseline_accuracy,
                            "final_accuracy": calibration.final_accuracy,
                            "exit_distribution": calibration.exit_distribution,
                        },
                        "path_macs": list(costs),
                        # earlyon's own static estimate (backbone FLOPs only, no heads)
                        "earlyon_estimated_saving": 1.0 - sim.avg_flops_fraction,
                        "simulation_matches": _same_as_simulation(sim, point),
                        "temperature_fallback": [
                            head
                            for head, fit in (calibration.temperature_fits or {}).items()
                            if fit.fallback
                        ],
                        "heads_oracle_saving": oracle,
                        **point,
                        "path": path,  # kept for the router check, not saved
                        "pred": preds,
                    }
                )
    return results


def _same_as_simulation(sim: Any, point: dict[str, Any]) -> bool:
    """Whether earlyon's ``simulate_policy`` saw the same exits and answers as our replay."""
    n_exits = len(point["exit_rates"]) - 1
    ours = {
        ("final" if p == n_exits else f"exit_{p}"): rate
        for p, rate in enumerate(point["exit_rates"])
        if rate > 0
    }
    same_exits = ours.keys() == sim.exit_distribution.keys() and all(
        math.isclose(rate, sim.exit_distribution[k], abs_tol=1e-9) for k, rate in ours.items()
    )
    return same_exits and math.isclose(sim.accuracy, point["accuracy_early"], abs_tol=1e-9)


def run_earlyon(
    eo: SimpleNamespace,
    w: Any,
    eem: Any,
    names: Sequence[str],
    stream: Stream,
    args: argparse.Namespace,
    seed: int,
) -> dict[str, Any]:
    """Every earlyon setting on the same stream, measured with our MAC accounting."""
    shapes = feature_shapes(w.model, names, w.input_size)
    results: list[dict[str, Any]] = []
    trained: dict[tuple[str, int], TrainedHeads] = {}
    for split, hidden in itertools.product(args.eo_splits, args.eo_hidden):
        heads = train_earlyon(eo, w, names, shapes, stream, split, hidden, args, seed)
        trained[(split, hidden)] = heads
        start = time.perf_counter()
        for epochs in sorted(heads.snapshots):
            results += calibrate_snapshot(
                eo, heads, epochs, split, hidden, stream, eem, args, w.num_classes
            )
        log(
            f"  earlyon: MLP-{hidden}, {split} split: trained in {heads.train_seconds:.0f} s, "
            f"calibrated and measured in {time.perf_counter() - start:.0f} s"
        )
    return {
        "results": results,
        "trained": trained,
        "feature_shapes": [list(s) for s in shapes],
        "simulation_mismatches": sum(not r["simulation_matches"] for r in results),
    }


def earlyon_selection(
    results: Sequence[dict[str, Any]], goal: Goal, oracle: float
) -> list[dict[str, Any]]:
    """The rows earlyon gets: README defaults and best setting, for each calibration target."""
    rows = []
    for targets, label in (("labels", "labels"), ("full model", "full-model answers")):
        pool = [r for r in results if r["setting"]["targets"] == targets]
        if not pool:
            continue
        default_drop = EARLYON_DEFAULT_DROP if targets == "labels" else round(1.0 - goal.level, 6)
        default = [
            r
            for r in pool
            if EarlyonSetting(**r["setting"]).is_default()
            and math.isclose(r["setting"]["drop"], default_drop)
        ]
        if default:
            r = default[0]
            rows.append(
                row(
                    f"earlyon, calibrated on {label}: defaults",
                    EarlyonSetting(**r["setting"]).describe(),
                    r,
                    oracle,
                    goal,
                    key=f"earlyon_{targets.replace(' ', '_')}_default",
                    heads_oracle=r["heads_oracle_saving"],
                    hindsight=False,
                    earlyon=r,
                )
            )
        ok = [r for r in pool if goal.met(r)]
        best = max(ok, key=lambda r: r["mac_saving"]) if ok else _most_agreeing(pool, goal)
        rows.append(
            row(
                f"earlyon, calibrated on {label}: best setting",
                EarlyonSetting(**best["setting"]).describe()
                + ("" if ok else f"; no setting reaches {goal.level:g}: the most agreeing one"),
                best,
                oracle,
                goal,
                key=f"earlyon_{targets.replace(' ', '_')}_best",
                heads_oracle=best["heads_oracle_saving"],
                hindsight=True,
                settings_tried=len(pool),
                settings_meeting_target=len(ok),
                earlyon=best,
            )
        )
    return rows


@torch.no_grad()
def verify_router(
    trained: dict[tuple[str, int], TrainedHeads],
    entry: dict[str, Any],
    x_ev: Tensor,
    samples: int,
    per_path: int = 2,
) -> dict[str, Any]:
    """Serve held-out samples through earlyon's real batch-1 router with this setting.

    Checks the exit and answer against the replay, and counts the MACs the router actually ran
    (a few samples per path) against our path accounting: this is what shows that leaving early
    really skips the rest of the backbone.
    """
    s = entry["setting"]
    heads = trained[(s["split"], s["hidden"])]
    wrapper = heads.wrapper
    wrapper.exit_heads.load_state_dict(heads.snapshots[s["epochs"]])
    restore_config(wrapper.config, entry["config"])
    wrapper.eval()
    _ = wrapper.flops_estimate  # earlyon's lazy static analysis runs on first use: not in counts
    n_exits = len(wrapper.config.exit_points)
    count = min(samples, x_ev.shape[0])
    expected = entry["path"][:count]
    got, answers, measured = [], [], {}
    for i in range(count):
        x = x_ev[i : i + 1]
        path = int(expected[i])
        if len(measured.get(path, [])) < per_path:
            with MacCounter() as counter:
                result = wrapper(x, mode="inference")
            measured.setdefault(path, []).append(counter.total)
        else:
            result = wrapper(x, mode="inference")
        got.append(n_exits if result.exit_taken == -1 else result.exit_taken)
        answers.append(int(result.prediction.argmax(dim=-1)))
    got_t = torch.tensor(got)
    costs = entry["path_macs"]
    mac_ok = all(m == costs[p] for p, ms in measured.items() for m in ms)
    return {
        "samples": count,
        "exit_mismatches": int((got_t != expected).sum()),
        "answer_mismatches": int((torch.tensor(answers) != entry["pred"][:count]).sum()),
        "measured_macs": {str(p): ms for p, ms in sorted(measured.items())},
        "accounted_macs": {str(p): costs[p] for p in sorted(measured)},
        "macs_match": mac_ok,
    }


# ------------------------------------------------------------------------------------ one seed


def run(args: argparse.Namespace, seed: int, eo: SimpleNamespace | None) -> dict[str, Any]:
    from earlyexit.evaluation.workloads import load_workload

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    w = load_workload(
        args.workload, traffic_size=args.traffic_size, eval_size=args.eval_size, seed=seed
    )
    if not w.labelled:
        raise SystemExit(f"workload {w.name!r} is unlabelled; earlyon and SDN train on labels")
    w.model.eval()
    log(f"[{w.name} seed {seed}] {w.description}")
    start = time.perf_counter()
    x_tr, y_tr = materialize(w.traffic)
    x_ev, y_ev = materialize(w.evaluation)
    seconds["render"] = time.perf_counter() - start
    traffic, evaluation = TensorDataset(x_tr, y_tr), TensorDataset(x_ev, y_ev)

    start = time.perf_counter()
    report, eem, ours_seconds = run_ours(w, traffic, evaluation, args, seed)
    seconds["ours"] = time.perf_counter() - start
    names = [e["name"] for e in report["exits"]]
    goal = Goal(args.target, args.agreement_on)
    rows, oracle = ours_rows(report, goal)
    log(f"  ours: exits at {', '.join(names)}; MAC saving {report['mac_saving']:.1%}")

    full_tr = full_model_logits(w.model, x_tr).argmax(dim=-1)
    full_ev = full_model_logits(w.model, x_ev).argmax(dim=-1)
    accuracy_full = float((full_ev == y_ev).double().mean())
    # Within half a sample: the report may average in another precision.
    if abs(accuracy_full - report["accuracy_full"]) > 0.5 / x_ev.shape[0]:
        log(
            f"  warning: full-model accuracy {accuracy_full:.4f} here vs {report['accuracy_full']:.4f}"
            " in our report: the two sides do not see the same model"
        )

    earlyon_out: dict[str, Any] | None = None
    if eo is not None:
        start = time.perf_counter()
        stream = Stream(x_tr, y_tr, x_ev, y_ev, full_traffic=full_tr, full_eval=full_ev)
        eo_run = run_earlyon(eo, w, eem, names, stream, args, seed)
        seconds["earlyon"] = time.perf_counter() - start
        selected = earlyon_selection(eo_run["results"], goal, oracle)
        start = time.perf_counter()
        for r in selected:
            entry = r.pop("earlyon")
            r["earlyon_setting"] = entry["setting"]
            r["earlyon_config"] = entry["config"]
            r["earlyon_estimated_saving"] = entry["earlyon_estimated_saving"]
            r["router_check"] = verify_router(eo_run["trained"], entry, x_ev, args.verify_samples)
            if r["router_check"]["exit_mismatches"] or not r["router_check"]["macs_match"]:
                log(f"  warning: earlyon's router disagrees with the replay for {r['method']}")
        seconds["earlyon_verify"] = time.perf_counter() - start
        rows[-1:-1] = selected  # before the oracle row
        earlyon_out = {
            "version": eo.version,
            "feature_shapes": eo_run["feature_shapes"],
            "head_macs": {
                f"MLP-{hidden}": heads.head_macs for (_, hidden), heads in eo_run["trained"].items()
            },
            "train_seconds": {
                f"{split}/MLP-{hidden}": round(heads.train_seconds, 1)
                for (split, hidden), heads in eo_run["trained"].items()
            },
            "simulation_mismatches": eo_run["simulation_mismatches"],
            "settings": settings_table(eo_run["results"]),
        }
    else:
        log(f"  earlyon is not installed: its rows are skipped ({INSTALL_HINT})")

    return {
        "workload": w.name,
        "description": w.description,
        "seed": seed,
        "target_agreement": args.target,
        "target_on": args.agreement_on,
        "traffic_samples": int(x_tr.shape[0]),
        "eval_samples": int(x_ev.shape[0]),
        "base_macs": eem.base_macs,
        "exits": [
            {"name": e.name, "backbone_macs": b, "our_head_macs": h}
            for e, b, h in zip(eem.exits, eem.backbone_macs, eem.head_macs, strict=True)
        ],
        "accuracy_full": accuracy_full,
        "oracle_mac_saving": oracle,
        "rows": rows,
        "ours": {
            key: report.get(key)
            for key in (
                "mac_saving",
                "oracle_mac_saving",
                "saving_of_oracle",
                "agreement",
                "accuracy_full",
                "accuracy_early",
                "thresholds",
                "exits",
                "final",
                "methods",
            )
        },
        "ours_model": report["model"],
        "ours_learner": {
            key: report["learner"].get(key)
            for key in ("samples", "phase", "train_steps", "calibrations", "evidence", "loss")
        },
        "ours_seconds": {k: round(v, 1) for k, v in ours_seconds.items()},
        "earlyon": earlyon_out,
        "earlyon_install": None if eo is not None else INSTALL_HINT,
        "seconds": {
            k: round(v, 1) for k, v in {**seconds, "total": time.perf_counter() - t_start}.items()
        },
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }


# ------------------------------------------------------------------------------------ output


def _pct(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{round(100 * float(v), digits) + 0.0:.{digits}f}%"


def markdown_table(result: dict[str, Any]) -> str:
    lines = [
        f"### {result['workload']}, seed {result['seed']}: {result['traffic_samples']} traffic / "
        f"{result['eval_samples']} held-out samples; target: "
        + Goal(result["target_agreement"], result["target_on"]).describe(),
        "",
        "| method | setting | MAC saving | agreement with full model (all / among exits) "
        "| accuracy early vs full | share of oracle saving | oracle of its heads |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        mark = "" if r["meets_target"] or r["key"] == "oracle" else " (below target)"
        lines.append(
            f"| {r['method']} | {r['setting']} | {_pct(r['mac_saving'])} | "
            f"{_pct(r['agreement'], 2)} / {_pct(r['agreement_exited'], 2)}{mark} | "
            f"{_pct(r['accuracy_early'], 2)} vs {_pct(r['accuracy_full'], 2)} | "
            f"{_pct(r['share_of_oracle'])} | {_pct(r['heads_oracle_saving'])} |"
        )
    lines += [
        "",
        "All figures on the held-out evaluation split; MACs in earlyexit's accounting (heads on the "
        "way included). Share of oracle: of the oracle on our online heads (last row); oracle of "
        "its heads: each sample leaves at the first of the row's own heads that agrees with the "
        "full model. 'best' rows chose their setting in hindsight on the evaluation split.",
    ]
    return "\n".join(lines)


def summary(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, min and max over seeds of each row's headline figures (rows matched by key)."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(r["key"] for res in results for r in res["rows"]):
        rows = [r for res in results for r in res["rows"] if r["key"] == key]
        entry: dict[str, Any] = {"method": rows[0]["method"], "seeds": len(rows)}
        for field in ("mac_saving", "agreement", "share_of_oracle"):
            values = [r[field] for r in rows if r[field] is not None]
            if values:
                entry[field] = {
                    "mean": sum(values) / len(values),
                    "min": min(values),
                    "max": max(values),
                }
        out[key] = entry
    return out


def summary_table(stats: dict[str, Any], seeds: Sequence[int]) -> str:
    lines = [
        f"### mean over seeds {', '.join(map(str, seeds))} (min - max)",
        "",
        "| method | MAC saving | agreement with full model | share of oracle saving |",
        "|---|---:|---:|---:|",
    ]

    def cell(s: dict[str, float] | None, digits: int = 1) -> str:
        if not s:
            return "-"
        return f"{_pct(s['mean'], digits)} ({_pct(s['min'], digits)} - {_pct(s['max'], digits)})"

    for entry in stats.values():
        lines.append(
            f"| {entry['method']} | {cell(entry.get('mac_saving'))} | "
            f"{cell(entry.get('agreement'), 2)} | {cell(entry.get('share_of_oracle'))} |"
        )
    return "\n".join(lines)


SETTING_COLUMNS = (
    *(f.name for f in fields(EarlyonSetting)),
    "mac_saving",
    "agreement",
    "agreement_exited",
    "accuracy_early",
    "exit_rate",
    "heads_oracle_saving",
    "earlyon_estimated_saving",
    "enabled_exits",
    "thresholds",
    "temperature_fallback",
)


def settings_table(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every earlyon setting tried, one compact row each (the chosen rows keep full detail)."""

    def cells(r: dict[str, Any]) -> list[Any]:
        config = r["config"]
        policy = config["routing_policy"]
        thresholds = config[
            "confidence_thresholds" if policy == "confidence" else "entropy_thresholds"
        ]
        numbers = [round(r[k], 5) for k in SETTING_COLUMNS[len(r["setting"]) : -3]]
        return [
            *r["setting"].values(),
            *numbers,
            "".join("1" if on else "0" for on in config["enabled_exits"]),
            [round(t, 4) for t in thresholds],
            r["temperature_fallback"],
        ]

    return {"columns": list(SETTING_COLUMNS), "rows": [cells(r) for r in results]}


def dumps(value: Any, indent: int = 0, width: int = 160) -> str:
    """JSON with ``indent=2``, except that anything fitting in ``width`` stays on one line (so the
    settings table is one line per setting, not one line per number)."""
    flat = json.dumps(value, allow_nan=False)
    if len(flat) + indent <= width or not isinstance(value, dict | list) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {dumps(v, indent + 2, width)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + dumps(v, indent + 2, width) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def write_json(path: Path, payload: Any) -> None:
    """Atomic: a reader (or an interrupted run) never sees a half-written file."""
    from earlyexit._json import json_safe

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would otherwise survive the rename
        with os.fdopen(fd, "w") as f:
            f.write(dumps(json_safe(payload)) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\nExample:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:" + __doc__.split("\n\nExample:")[1],
    )
    parser.add_argument(
        "--workload", default="fashion", help="a labelled workload (default fashion)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="one or more seeds (workload draw, heads, evidence); one JSON per seed",
    )
    parser.add_argument(
        "--traffic-size",
        type=int,
        default=None,
        metavar="N",
        help="traffic samples (default: the workload's)",
    )
    parser.add_argument(
        "--eval-size",
        type=int,
        default=None,
        metavar="N",
        help="held-out samples (default: the workload's)",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=0.99,
        help="agreement with the full model to match (default 0.99)",
    )
    parser.add_argument(
        "--agreement-on",
        choices=("all", "exited"),
        default="all",
        help="where the target agreement must hold for a point to count (and the best rows to be "
        "picked): over all held-out samples (default, as the report's sweeps) or among the samples "
        "that left early (what our online calibration guarantees)",
    )
    parser.add_argument(
        "--head",
        default=None,
        help="our exit-head kind (default: the pipeline's, as `earlyexit demo` uses)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument(
        "--out", default=None, metavar="DIR", help=f"JSON folder (default {RESULTS})"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch CPU threads, pinned for the whole run (default torch's; use 1 on a machine "
        "shared with another job: oversubscribed threads made forward passes 20x slower here)",
    )
    parser.add_argument(
        "--require-earlyon",
        action="store_true",
        help=f"exit {EXIT_NO_EARLYON} if earlyon is missing instead of skipping its rows",
    )
    parser.add_argument(
        "--quiet", dest="progress", action="store_false", help="no progress on stderr"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller earlyon sweep (MLP-128, 5/20 epochs, holdout split) unless set below",
    )
    parser.add_argument(
        "--verify-samples",
        type=int,
        default=10**9,
        metavar="N",
        help="held-out samples served through earlyon's batch-1 router per reported "
        "row to check the replay (default: all)",
    )
    sweep = parser.add_argument_group("earlyon settings swept (each at its best)")
    sweep.add_argument(
        "--eo-hidden",
        type=int,
        nargs="+",
        default=None,
        help="head hidden widths (default 128 512; --quick 128)",
    )
    sweep.add_argument(
        "--eo-epochs",
        type=int,
        nargs="+",
        default=None,
        help="stage-2 epochs (default 5 10 20; --quick 5 20; one run, snapshots)",
    )
    sweep.add_argument(
        "--eo-splits",
        nargs="+",
        choices=("holdout", "all"),
        default=None,
        help="calibration split (default both; --quick holdout)",
    )
    sweep.add_argument(
        "--eo-policies",
        nargs="+",
        choices=("confidence", "entropy"),
        default=["confidence", "entropy"],
        help="routing policies (default both)",
    )
    sweep.add_argument(
        "--eo-temperature",
        choices=("off", "on", "both"),
        default="both",
        help="per-head temperature scaling (default both)",
    )
    sweep.add_argument(
        "--eo-grids",
        nargs="+",
        choices=("default", "fine"),
        default=["default", "fine"],
        help="threshold grids (default both)",
    )
    sweep.add_argument(
        "--eo-drops",
        type=float,
        nargs="+",
        default=[0.0, 0.005, 0.01, 0.02],
        help="target accuracy drops, label calibration (default 0 0.005 0.01 0.02)",
    )
    sweep.add_argument(
        "--eo-pseudo-drops",
        type=float,
        nargs="+",
        default=[0.0, 0.005],
        help="extra drops on full-model answers (1 - target is always tried)",
    )
    sweep.add_argument(
        "--eo-lr", type=float, default=1e-3, help="stage-2 Adam lr (earlyon's default)"
    )
    sweep.add_argument("--eo-batch", type=int, default=64, help="stage-2 batch size (default 64)")
    args = parser.parse_args(argv)
    # --quick shrinks only what was not given explicitly.
    for name, full, quick in (
        ("eo_hidden", [128, 512], [128]),
        ("eo_epochs", [5, 10, 20], [5, 20]),
        ("eo_splits", ["holdout", "all"], ["holdout"]),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if not 0.0 < args.target < 1.0:
        parser.error("--target must be in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    eo = import_earlyon()
    if eo is None:
        message = f"earlyon is not installed; to compare with it: {INSTALL_HINT}"
        if args.require_earlyon:
            log(message)
            return EXIT_NO_EARLYON
        log(message + " (its rows are skipped)")
    torch.set_num_threads(args.threads)
    # fvcore (earlyon's FLOPs estimate) scripts a function with torch.jit: noise, not a finding.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    out_dir = Path(args.out) if args.out else RESULTS
    results = []
    for seed in dict.fromkeys(args.seed):
        result = run(args, seed, eo)
        path = out_dir / f"side_by_side_{result['workload']}_seed{seed}.json"
        write_json(path, result)
        log(f"  wrote {path}")
        results.append(result)
        if not args.json:
            print(markdown_table(result) + "\n", flush=True)
    stats = summary(results) if len(results) > 1 else None
    if args.json:
        from earlyexit._json import json_safe

        payload = results[0] if stats is None else {"runs": results, "summary": stats}
        print(dumps(json_safe(payload)))
    elif stats is not None:
        print(summary_table(stats, [r["seed"] for r in results]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
