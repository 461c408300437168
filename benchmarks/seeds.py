"""Evidence for the seeds: gates, final supervisor, cascades, placement and data cartography.

One stream, one script. It prints a summary and writes ``seeds.json`` and PNG figures under
``benchmarks/results/`` (or ``--out``).

The stream is the project's labelled digits workload (``load_workload("digits")``): the shipped
timm ``regnety_002`` reference backbone (trained on the workload's *train* split, never touched
here) served 3x64x64 renders of scikit-learn digits with per-sample difficulty. Its *traffic* split
(default 4000 renders of 360 source images) is cut by source image, 60/40, into a head-training part
(the exit heads learn from it by self-distillation from the backbone's own output, no labels, and
its training dynamics give the data map) and a calibration part (thresholds, supervisor). Its
*evaluation* split (default 2000 renders of 359 other source images) is the test part: every
reported figure is on it unless said otherwise. No source image is shared between the three parts.

The cascades' cheap local tiers are (a) the same backbone cut at an early exit (its stages up to
that exit plus the exit head trained above) and (b) small CNNs distilled from the backbone's output
on the head-training part only (no labels); the remote tier is the full ``regnety_002`` served over
loopback HTTP.

Run: ``python benchmarks/seeds.py [--out DIR] [--quick] [--traffic-size N] [--eval-size N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import earlyexit as ee  # noqa: E402
from earlyexit.calibration import calibrate_thresholds  # noqa: E402
from earlyexit.cartography import (  # noqa: E402
    HARD,
    REGION_NAMES,
    DifficultyRouter,
    plot_data_map,
    train_heads_offline,
)
from earlyexit.cascade import (  # noqa: E402
    Cascade,
    EarlyExitTier,
    EnsembleTier,
    LocalTier,
    RemoteTier,
)
from earlyexit.cascade._loopback import ModelServer  # noqa: E402
from earlyexit.costs.macs import count_macs  # noqa: E402
from earlyexit.costs.placement import (  # noqa: E402
    Link,
    Site,
    StageProfile,
    evaluate_placement,
    heads_paid,
    optimise_placement,
    sample_costs,
)
from earlyexit.evaluation.workloads import load_digits_backbone, load_workload  # noqa: E402
from earlyexit.gates import gate_names, gate_scores, make_gate  # noqa: E402
from earlyexit.routing import simulate_exits  # noqa: E402
from earlyexit.supervisors import (  # noqa: E402
    Supervisor,
    accepted_accuracy_curve,
    auroc,
    right_predictions,
)

TARGETS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
CONFIDENCE = 0.9
HEAD_TRAINING_SHARE = 0.6  # of the traffic split's source images; the rest calibrate
CASCADE_EXIT = 1  # the early exit the "backbone cut" cascade tier stops at


# ---------------------------------------------------------------------------- the stream
@dataclass
class Stream:
    description: str
    x: Tensor  # [N, 3, 64, 64] traffic renders, then evaluation renders
    y: Tensor  # [N] labels (for accuracy and the supervisor's calibration only)
    split: Tensor  # [N] 0 head training, 1 calibration (both traffic), 2 test (evaluation)
    difficulty: Tensor  # [N] the latent difficulty each sample was rendered with
    reference: nn.Module  # the large model (eval mode)
    input_size: tuple[int, int, int]


def _render(data: torch.utils.data.Dataset) -> tuple[Tensor, Tensor, Tensor]:
    loader = torch.utils.data.DataLoader(data, batch_size=256, shuffle=False)
    xs, ys = zip(*loader, strict=True)
    difficulty = torch.tensor([data.describe(i)["difficulty"] for i in range(len(data))])
    return torch.cat(xs), torch.cat(ys), difficulty


def build_stream(traffic_size: int, eval_size: int) -> Stream:
    wl = load_workload("digits", traffic_size=traffic_size, eval_size=eval_size)
    x_traffic, y_traffic, d_traffic = _render(wl.traffic)
    x_eval, y_eval, d_eval = _render(wl.evaluation)
    # Traffic sample i renders source image sources[i % len(sources)]: cut by source image.
    n_sources = len(wl.traffic.sources)
    order = torch.randperm(n_sources, generator=torch.Generator().manual_seed(0))
    calibration_sources = torch.zeros(n_sources, dtype=torch.bool)
    calibration_sources[order[round(HEAD_TRAINING_SHARE * n_sources) :]] = True
    position = torch.arange(len(y_traffic)) % n_sources
    split = torch.cat(
        [calibration_sources[position].long(), torch.full((len(y_eval),), 2, dtype=torch.long)]
    )
    return Stream(
        f"{wl.description}; traffic cut by source image {HEAD_TRAINING_SHARE:.0%}"
        f"/{1 - HEAD_TRAINING_SHARE:.0%} into head training / calibration, evaluation = test",
        torch.cat([x_traffic, x_eval]),
        torch.cat([y_traffic, y_eval]),
        split,
        torch.cat([d_traffic, d_eval]),
        wl.model,
        wl.input_size,
    )


def small_cnn(seed: int, width: int = 16) -> nn.Module:
    """A cheap local model: 2x average pooling (the digits are 8x8 at heart), three strided
    conv-BN-ReLU blocks and a linear layer (~0.7 MMACs at width 16 on 3x64x64, against ~17 for
    the reference)."""
    torch.manual_seed(seed)

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        ]

    return nn.Sequential(
        nn.AvgPool2d(2),
        *block(3, width),
        *block(width, 2 * width),
        *block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, 10),
    )


def distill_classifier(
    model: nn.Module,
    x: Tensor,
    teacher_logits: Tensor,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 64,
) -> nn.Module:
    """Train ``model`` to match the reference's softmax on ``x`` (KL divergence; no labels)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(x.shape[0] / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    target = teacher_logits.float().log_softmax(-1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=g)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            loss = F.kl_div(
                model(x[idx]).log_softmax(-1), target[idx], log_target=True, reduction="batchmean"
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def batched(fn, x: Tensor, size: int = 256) -> Tensor:
    return torch.cat([fn(chunk) for chunk in x.split(size)])


# ---------------------------------------------------------------------------- early exits
def build_early_exits(stream: Stream, epochs: int) -> dict:
    eem = ee.wrap(stream.reference, input_size=stream.input_size, head="linear")
    num_exits = eem.num_exits
    zs: list[list[Tensor]] = [[] for _ in range(num_exits)]
    finals = []
    for chunk in stream.x.split(256):
        with torch.no_grad():
            _, trace = eem.trace(chunk)
        for e, rec in enumerate(trace.exits):
            zs[e].append(rec.z[torch.argsort(rec.rows)])
        finals.append(trace.final_logits)
    z = [torch.cat(parts) for parts in zs]
    final = torch.cat(finals)
    train = stream.split == 0
    heads, data_map = train_heads_offline(
        [zi[train] for zi in z], final[train], eem.heads, epochs=epochs, lr=3e-3, batch_size=64
    )
    for head, trained in zip(eem.heads, heads, strict=True):
        head.load_state_dict(trained.state_dict())
    with torch.no_grad():
        head_logits = torch.stack(
            [h.classify(zi) for h, zi in zip(eem.heads, z, strict=True)], dim=1
        )
    return {"eem": eem, "z": z, "final": final, "head_logits": head_logits, "data_map": data_map}


def policy_outcome(eem, gate, scores, thresholds, head_logits, final, y) -> dict:
    """MAC saving, agreement and accuracy of thresholds on a recorded stream (offline)."""
    exits = simulate_exits(scores, thresholds)
    eem.gate = make_gate(gate)
    paths = torch.tensor(eem.path_macs(thresholds), dtype=torch.float64)
    stack = torch.cat([head_logits, final[:, None]], dim=1)
    pred = stack.argmax(-1).gather(1, exits[:, None]).squeeze(1)
    return {
        "mac_saving": 1.0 - float(paths[exits].mean()) / eem.base_macs,
        "agreement": float((pred == final.argmax(-1)).float().mean()),
        "accuracy": float((pred == y).float().mean()),
        "exit_rates": torch.bincount(exits, minlength=eem.num_exits + 1).div(len(exits)).tolist(),
    }


def section_gates(stream: Stream, ex: dict, out: Path) -> dict:
    eem, head_logits, final = ex["eem"], ex["head_logits"], ex["final"]
    cal, test = stream.split == 1, stream.split == 2
    agree = head_logits.argmax(-1) == final.argmax(-1)[:, None]
    gates = [*gate_names(), {"name": "agreement", "k": 1, "confidence": "max_softmax"}]
    curves = {}
    for g in gates:
        gate = make_gate(g)
        label = g if isinstance(g, str) else "agreement(k=1)*max_softmax"
        scores = gate_scores(gate, head_logits)
        points = []
        for target in TARGETS:
            res = calibrate_thresholds(scores[cal], agree[cal], target, CONFIDENCE)
            o = policy_outcome(
                eem,
                gate,
                scores[test],
                res.thresholds,
                head_logits[test],
                final[test],
                stream.y[test],
            )
            points.append(
                {
                    "target": target,
                    "thresholds": [t if math.isfinite(t) else None for t in res.thresholds],
                    **o,
                }
            )
        curves[label] = points
    # Oracle: every sample at the first head that agrees (all heads paid up to there).
    first = torch.where(agree[test].any(1), agree[test].float().argmax(1), eem.num_exits)
    eem.gate = make_gate("max_softmax")
    all_open = torch.tensor(eem.path_macs([0.0] * eem.num_exits), dtype=torch.float64)
    oracle = 1.0 - float(all_open[first].mean()) / eem.base_macs
    _plot_curves(curves, oracle, out / "seeds_gates.png")
    return {"curves": curves, "oracle_mac_saving": oracle, "confidence": CONFIDENCE}


def _plot_curves(curves: dict, oracle: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, points in curves.items():
        ax.plot(
            [p["agreement"] for p in points],
            [p["mac_saving"] for p in points],
            marker="o",
            ms=3,
            label=label,
        )
    ax.axhline(oracle, color="grey", ls=":", label=f"oracle saving {oracle:.2f} (at agreement 1)")
    ax.set_xlabel("agreement with the full model (test)")
    ax.set_ylabel("MAC saving (fraction of the base model)")
    ax.set_title("Gates: LTT-calibrated thresholds, targets 0.80-0.99")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- final supervisor
def section_supervisor(stream: Stream, ex: dict, out: Path) -> dict:
    final = ex["final"]
    cal, test = stream.split == 1, stream.split == 2
    correct = right_predictions(final, stream.y)
    result = {"accuracy_full": float(correct[test].float().mean()), "scores": {}}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in ("max_softmax", "margin", "entropy", "gini"):
        sup = Supervisor(name)
        info = sup.calibrate(final[cal], stream.y[cal], target_fpr=0.05)
        scores = sup.score(final[test])
        accepted = scores >= sup.threshold
        right = correct[test]
        curve = accepted_accuracy_curve(scores, right)
        result["scores"][name] = {
            "auroc": auroc(scores, right),
            "threshold_for_fpr_0.05_on_calibration": info.threshold,
            "false_alarm_rate_test": float((right & ~accepted).sum()) / max(int(right.sum()), 1),
            "rejected_share_test": float((~accepted).float().mean()),
            "accepted_accuracy_test": float(right[accepted].float().mean())
            if accepted.any()
            else None,
            "curve": curve,
        }
        ax.plot(
            curve["rejected"],
            curve["accepted_accuracy"],
            label=f"{name} (AUROC {result['scores'][name]['auroc']:.3f})",
        )
    ax.set_xlabel("share of full-model predictions rejected")
    ax.set_ylabel("accuracy of the accepted ones (test, labels)")
    ax.set_title("Final supervisor on the full model's output")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "seeds_supervisor.png", dpi=120)
    plt.close(fig)
    return result


# ---------------------------------------------------------------------------- cascades
def backbone_cut(eem, exit_index: int) -> ee.EarlyExitModel:
    """A second wrapping of a fresh copy of the reference that always leaves at ``exit_index``:
    the backbone up to that exit plus its (trained) head, nothing after it is computed."""
    cut = ee.wrap(load_digits_backbone(), input_size=eem.input_size, head="linear")
    for head, trained in zip(cut.heads, eem.heads, strict=True):
        head.load_state_dict(trained.state_dict())
    cut.set_thresholds([-math.inf if i == exit_index else math.inf for i in range(cut.num_exits)])
    return cut


def _top_score_agreement(record) -> dict:
    """Per tier but the last: agreement with the last tier among its 10/25/50% best-scored samples
    (ties included), and the share of samples with the highest score it gives."""
    agree = record.agree()
    out = {}
    for t in range(record.scores.shape[1] - 1):
        scores = record.scores[:, t]
        row = {"top_score_share": float((scores == scores.max()).float().mean())}
        for share in (0.1, 0.25, 0.5):
            cut = torch.quantile(scores.double(), 1 - share)
            row[f"top_{share:.0%}"] = float(agree[scores.double() >= cut, t].float().mean())
        out[f"tier{t}"] = row
    return out


def section_cascade(stream: Stream, ex: dict, out: Path, quick: bool) -> dict:
    epochs = 8 if quick else 24
    train = stream.split == 0
    teacher = ex["final"][train]
    start = time.perf_counter()
    smalls = [
        distill_classifier(small_cnn(seed), stream.x[train], teacher, epochs, 5e-3, seed)
        for seed in (1, 2, 3)
    ]
    distill_seconds = time.perf_counter() - start
    cut = backbone_cut(ex["eem"], CASCADE_EXIT)
    size = (1, *stream.input_size)
    ref_macs = count_macs(stream.reference, size)
    small_macs = count_macs(smalls[0], size)
    cut_macs = cut.path_macs()[CASCADE_EXIT]
    cal, test = stream.split == 1, stream.split == 2
    final_test = ex["final"][test].argmax(-1)
    accuracy, agreement = {}, {}
    for name, model in {
        **{f"small {i}": m for i, m in enumerate(smalls)},
        f"backbone cut at exit {CASCADE_EXIT}": cut,
    }.items():
        pred = batched(model, stream.x[test]).argmax(-1)
        accuracy[name] = float((pred == stream.y[test]).float().mean())
        agreement[name] = float((pred == final_test).float().mean())
    results: dict = {
        "reference_macs": ref_macs,
        "small_macs": small_macs,
        "backbone_cut_exit": ex["eem"].exits[CASCADE_EXIT].name,
        "backbone_cut_macs": cut_macs,
        "local_models": (
            "small: 3 CNNs (small_cnn, width 16, seeds 1-3) distilled (KL to the reference's "
            f"softmax, no labels, {epochs} epochs) on the head-training traffic; backbone cut: "
            "regnety_002 up "
            f"to exit {CASCADE_EXIT} ({ex['eem'].exits[CASCADE_EXIT].name}) plus its exit head"
        ),
        "distill_seconds": distill_seconds,
        "accuracy_test": accuracy,
        "agreement_with_reference_test": agreement,
        "remote_cost": "per sample: the reference's MACs; per call: 1e6 (MAC-equivalents)",
        "runs": {},
    }
    with ModelServer(load_digits_backbone(), max_requests=10_000, lifetime=1800) as server:
        remote = RemoteTier(
            server.url,
            cost_per_sample=float(ref_macs),
            cost_per_call=1e6,
            max_batch=256,
            timeout=30.0,
        )
        setups = {
            f"backbone cut at exit {CASCADE_EXIT} -> remote (max_softmax)": Cascade(
                [EarlyExitTier(cut), remote], gate="max_softmax"
            ),
            "small -> remote (max_softmax, BiSupervised)": Cascade(
                [LocalTier(smalls[0]), remote], gate="max_softmax"
            ),
            "ensemble(3 small) -> remote (agreement, CoE)": Cascade(
                [EnsembleTier(smalls), remote], gate="agreement"
            ),
            f"ensemble(3 small) -> backbone cut at exit {CASCADE_EXIT} -> remote"
            " (agreement x max_softmax)": Cascade(
                [EnsembleTier(smalls), EarlyExitTier(cut), remote],
                gate={"name": "agreement", "confidence": "max_softmax"},
            ),
        }
        for label, cascade in setups.items():
            rec_cal = cascade.record(stream.x[cal], stream.y[cal])
            rec_test = cascade.record(stream.x[test], stream.y[test])
            points = []
            for target in TARGETS:
                res = cascade.calibrate(rec_cal, target, CONFIDENCE)
                sim = cascade.simulate(rec_test)
                sim.pop("exit_index")
                points.append(
                    {
                        "target": target,
                        "thresholds": [t if math.isfinite(t) else None for t in res.thresholds],
                        **sim,
                    }
                )
            # One live run through the real HTTP tier at target 0.97, compared with the replay.
            cascade.calibrate(rec_cal, 0.97, CONFIDENCE)
            calls_before = remote.calls
            start = time.perf_counter()
            live = cascade.predict(stream.x[test])
            seconds = time.perf_counter() - start
            replay = cascade.simulate(rec_test)
            results["runs"][label] = {
                "curve": points,
                "top_score_agreement_test": _top_score_agreement(rec_test),
                "live_at_0.97": {
                    "tier_rates": torch.bincount(live.exit_index, minlength=cascade.num_tiers)
                    .div(len(live))
                    .tolist(),
                    "matches_replay": bool(torch.equal(live.exit_index, replay["exit_index"])),
                    "http_calls": remote.calls - calls_before,
                    "mean_cost": float(cascade.last_cost.mean()),
                    "cost_saving": replay["cost_saving"],
                    "agreement": replay["agreement"],
                    "seconds": seconds,
                },
            }
        results["server_requests"] = server.requests
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, run in results["runs"].items():
        ax.plot(
            [p["agreement"] for p in run["curve"]],
            [p["cost_saving"] for p in run["curve"]],
            marker="o",
            ms=3,
            label=label,
        )
    ax.set_xlabel("agreement with the remote tier (test)")
    ax.set_ylabel("cost saving vs remote-only")
    ax.set_title("Cascades with a loopback HTTP remote tier")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "seeds_cascade.png", dpi=120)
    plt.close(fig)
    return results


# ---------------------------------------------------------------------------- placement + cartography
# Cost from the service's point of view, in abstract units: the user's device is cheap to the
# service (its energy and time are the user's) but slow; cloud GPUs are fast but rented; the
# mobile uplink is slow and metered, the edge-to-cloud backbone faster but billed per transfer.
SITES = [
    Site("device", cost_per_mac=0.25e-9, seconds_per_mac=2e-9),  # ~0.5 GMAC/s phone
    Site("edge", cost_per_mac=1e-9, seconds_per_mac=2e-10),
    Site("cloud", cost_per_mac=2e-9, seconds_per_mac=2e-11),
]
# Expected-latency objective of the placement search. The digits regnety_002 is ~17 MMACs: ~33 ms
# on the device alone, so without exits the device cannot meet 30 ms by itself; with exits it can.
SLO_S = 0.03
LINKS = [
    Link(cost_per_byte=5e-8, seconds_per_byte=1e-7, seconds_per_transfer=0.005),  # ~10 MB/s
    Link(
        cost_per_byte=2e-8, seconds_per_byte=1e-8, seconds_per_transfer=0.02, cost_per_transfer=1e-3
    ),
]


def section_placement(stream: Stream, ex: dict, out: Path) -> dict:
    eem, head_logits, final = ex["eem"], ex["head_logits"], ex["final"]
    profile = StageProfile.from_model(eem)
    mask = stream.split > 0
    scores = gate_scores("max_softmax", head_logits[mask])
    agree = (head_logits.argmax(-1) == final.argmax(-1)[:, None])[mask]
    best, candidates = optimise_placement(
        profile, SITES, LINKS, scores, agree, 0.95, CONFIDENCE, max_latency_s=SLO_S
    )
    e = eem.num_exits
    named = {}
    for name, assign in {"all device": (0,) * (e + 1), "all cloud": (2,) * (e + 1)}.items():
        match = [c for c in candidates if c.assignment == assign and c.enabled == best.enabled]
        named[name] = match[0].to_dict()
    named["cheapest ignoring the SLO"] = min(candidates, key=lambda c: c.expected_cost).to_dict()
    no_exit = [c for c in candidates if not any(c.enabled)]
    named["best without exits (within the SLO)"] = min(
        [c for c in no_exit if c.expected_latency_s <= SLO_S] or no_exit,
        key=lambda c: c.expected_cost,
    ).to_dict()
    _plot_placement(candidates, best, out / "seeds_placement.png")
    return {
        "slo_s": SLO_S,
        "profile": profile.__dict__,
        "sites": [s.__dict__ for s in SITES],
        "links": [link.__dict__ for link in LINKS],
        "target": 0.95,
        "best": best.to_dict(),
        "other_placements": named,
        "candidates": len(candidates),
    }


def _plot_placement(candidates, best, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    lat = [c.expected_latency_s * 1e3 for c in candidates]
    cost = [c.expected_cost for c in candidates]
    colour = [sum(c.enabled) for c in candidates]
    sc = ax.scatter(lat, cost, c=colour, s=10, cmap="viridis")
    ax.scatter(
        [best.expected_latency_s * 1e3],
        [best.expected_cost],
        marker="*",
        s=200,
        c="red",
        label=f"chosen {best.assignment}",
    )
    ax.axvline(SLO_S * 1e3, color="grey", ls=":", label="latency SLO")
    ax.set_xlabel("expected latency (ms)")
    ax.set_ylabel("expected cost per sample")
    ax.set_title("Placements x exit subsets at target agreement 0.95")
    fig.colorbar(sc, label="open exits")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section_cartography(stream: Stream, ex: dict, out: Path) -> dict:
    eem, head_logits, final, z, dm = (
        ex["eem"],
        ex["head_logits"],
        ex["final"],
        ex["z"],
        ex["data_map"],
    )
    plot_data_map(
        dm,
        str(out / "seeds_data_map.png"),
        title="Data map of the exit heads (head-training traffic)",
    )
    train, cal, test = stream.split == 0, stream.split == 1, stream.split == 2
    regions = dm.regions()
    counts = {REGION_NAMES[r]: int((regions == r).sum()) for r in range(3)}
    hard = regions == HARD
    # Does the map line up with the heads' behaviour? Agreement with the full model, averaged
    # over the exits, by region; and the latent difficulty the samples were rendered with.
    agree = head_logits.argmax(-1) == final.argmax(-1)[:, None]
    by_region = {
        REGION_NAMES[r]: float(agree[train][regions == r].float().mean())
        for r in range(3)
        if (regions == r).any()
    }
    difficulty = stream.difficulty[train]
    difficulty_by_region = {
        REGION_NAMES[r]: float(difficulty[regions == r].mean())
        for r in range(3)
        if (regions == r).any()
    }
    router = DifficultyRouter().fit(z[0][train], hard)
    p_hard = router.predict_proba(z[0][test])
    test_agree_any = agree[test, :-1].any(1)  # some shallow head would have answered correctly
    router_auroc = auroc(-p_hard, test_agree_any)
    profile = StageProfile.from_model(eem)
    scores = gate_scores("max_softmax", head_logits)
    e = eem.num_exits
    assignment = tuple(ex.get("assignment", (0,) + (1,) * (e - 1) + (2,)))
    # Routed samples: decided on the site of exit 0 from its feature; they skip the later heads
    # and every intermediate site, going straight to the last site with exit 0's activation.
    routed_assignment = (assignment[0],) + (len(SITES) - 1,) * e
    never_early = ~agree[test, :-1].any(1)  # no shallow head would agree: truly hard here
    rank = torch.argsort(torch.argsort(p_hard, descending=True)).float() / len(p_hard)
    policies = {
        "no routing": None,
        "route 5% most likely hard": rank < 0.05,
        "route 15% most likely hard": rank < 0.15,
        "perfect router (upper bound)": never_early,
    }
    points: dict[str, list] = {label: [] for label in policies}
    macs_head = torch.tensor(eem.head_macs, dtype=torch.float64)
    for target in TARGETS:
        res = calibrate_thresholds(scores[cal], agree[cal], target, CONFIDENCE)
        exits = simulate_exits(scores[test], res.thresholds)
        paid = heads_paid(int(test.sum()), [t != math.inf for t in res.thresholds])
        eem.gate = make_gate("max_softmax")
        macs_paths = torch.tensor(eem.path_macs(res.thresholds), dtype=torch.float64)
        for label, choice in policies.items():
            ex_i, paid_i = exits.clone(), paid.clone()
            routed = torch.zeros_like(exits, dtype=torch.bool)
            if choice is not None:
                routed = choice & (ex_i > 0)  # a sample already leaving at exit 0 stays
                ex_i[routed] = e
                paid_i[routed, 1:] = False
            cost = sample_costs(profile, SITES, LINKS, assignment, ex_i, paid_i)
            secs = sample_costs(profile, SITES, LINKS, assignment, ex_i, paid_i, latency=True)
            if routed.any():
                cost[routed] = sample_costs(
                    profile, SITES, LINKS, routed_assignment, ex_i[routed], paid_i[routed]
                )
                secs[routed] = sample_costs(
                    profile,
                    SITES,
                    LINKS,
                    routed_assignment,
                    ex_i[routed],
                    paid_i[routed],
                    latency=True,
                )
            rep = evaluate_placement(profile, SITES, LINKS, assignment, ex_i, paid_i, agree[test])
            macs = macs_paths[ex_i] - (paid & ~paid_i).double() @ macs_head
            points[label].append(
                {
                    "target": target,
                    "agreement": rep.agreement,
                    "placement_cost_saving": 1.0 - float(cost.mean()) / rep.cost_all_cloud,
                    "expected_latency_s": float(secs.mean()),
                    "mac_saving": 1.0 - float(macs.mean()) / eem.base_macs,
                    "routed_share": float(routed.float().mean()),
                }
            )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, pts in points.items():
        axes[0].plot(
            [p["agreement"] for p in pts],
            [p["mac_saving"] for p in pts],
            marker="o",
            ms=3,
            label=label,
        )
        axes[1].plot(
            [p["agreement"] for p in pts],
            [p["placement_cost_saving"] for p in pts],
            marker="o",
            ms=3,
            label=label,
        )
    axes[0].set_ylabel("MAC saving")
    axes[1].set_ylabel(f"cost saving vs all-cloud (placement {assignment})")
    for ax in axes:
        ax.set_xlabel("agreement with the full model (test)")
        ax.legend(fontsize=7)
    fig.suptitle("Routing samples the data map calls hard straight to the last site")
    fig.tight_layout()
    fig.savefig(out / "seeds_cartography_routing.png", dpi=120)
    plt.close(fig)
    return {
        "regions_head_training": counts,
        "exit_agreement_by_region_head_training": by_region,
        "rendered_difficulty_by_region_head_training": difficulty_by_region,
        "router_auroc_hard_vs_answerable_test": router_auroc,
        "assignment": assignment,
        "curves": points,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--quick", action="store_true", help="1200 / 600 samples, fewer epochs (smoke run)"
    )
    parser.add_argument("--traffic-size", type=int, default=None, help="default 4000 (1200 quick)")
    parser.add_argument("--eval-size", type=int, default=None, help="default 2000 (600 quick)")
    args = parser.parse_args(argv)
    traffic_size = args.traffic_size or (1200 if args.quick else 4000)
    eval_size = args.eval_size or (600 if args.quick else 2000)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}

    def timed(name: str, fn, *a):
        start = time.perf_counter()
        value = fn(*a)
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"[{name}: {seconds[name]:.0f} s]", flush=True)
        return value

    stream = timed("render stream", build_stream, traffic_size, eval_size)
    print(f"stream: {stream.description}; {len(stream.y)} samples", flush=True)
    ex = timed("trace + train heads", build_early_exits, stream, 4 if args.quick else 10)
    print(f"exits: {[p.name for p in ex['eem'].exits]}", flush=True)
    report: dict = {
        "stream": stream.description,
        "samples": len(stream.y),
        "split_sizes": torch.bincount(stream.split).tolist(),
    }
    report["gates"] = timed("gates", section_gates, stream, ex, out)
    report["supervisor"] = timed("supervisor", section_supervisor, stream, ex, out)
    report["placement"] = timed("placement", section_placement, stream, ex, out)
    ex["assignment"] = tuple(report["placement"]["best"]["assignment"])
    report["cartography"] = timed("cartography", section_cartography, stream, ex, out)
    report["cascade"] = timed("cascade", section_cascade, stream, ex, out, args.quick)
    report["section_seconds"] = seconds
    report["seconds"] = time.perf_counter() - t0
    (out / "seeds.json").write_text(json.dumps(report, indent=1, default=float))
    _print_summary(report)
    return 0


def _print_summary(r: dict) -> None:
    print(f"\nfull model accuracy (test): {r['supervisor']['accuracy_full']:.3f}")
    print(
        f"gates (target 0.95 / 0.99, LTT confidence {CONFIDENCE}); oracle saving {r['gates']['oracle_mac_saving']:.3f}"
    )
    for label, pts in r["gates"]["curves"].items():
        at = {p["target"]: p for p in pts}
        a, b = at[0.95], at[0.99]
        print(
            f"  {label:28s} saving {a['mac_saving']:.3f} agr {a['agreement']:.3f} acc {a['accuracy']:.3f}"
            f" | saving {b['mac_saving']:.3f} agr {b['agreement']:.3f} acc {b['accuracy']:.3f}"
        )
    print("final supervisor (test):")
    for name, s in r["supervisor"]["scores"].items():
        print(
            f"  {name:12s} AUROC {s['auroc']:.3f}  FPR {s['false_alarm_rate_test']:.3f} (target 0.05)  rejected {s['rejected_share_test']:.3f}  accepted acc {s['accepted_accuracy_test']}"
        )
    best = r["placement"]["best"]
    print(
        f"placement (target 0.95, latency <= {r['placement']['slo_s'] * 1e3:.0f} ms): best {best['assignment']} exits {best['enabled']} cost saving {best['cost_saving']:.3f} latency {best['expected_latency_s'] * 1e3:.2f} ms agreement {best['agreement']:.3f}"
    )
    for name, rep in r["placement"]["other_placements"].items():
        print(
            f"  {name:10s} cost saving {rep['cost_saving']:.3f} latency {rep['expected_latency_s'] * 1e3:.2f} ms"
        )
    c = r["cartography"]
    print(
        f"data map regions: {c['regions_head_training']}; exit agreement by region {c['exit_agreement_by_region_head_training']}"
    )
    print(f"  rendered difficulty by region: {c['rendered_difficulty_by_region_head_training']}")
    print(
        f"router AUROC (hard vs answerable early, test): {c['router_auroc_hard_vs_answerable_test']:.3f}"
    )
    for label, pts in c["curves"].items():
        at = {p["target"]: p for p in pts}[0.95]
        print(
            f"  {label:24s} @0.95: agr {at['agreement']:.3f} MAC saving {at['mac_saving']:.3f} placement saving {at['placement_cost_saving']:.3f} routed {at['routed_share']:.3f}"
        )
    cas = r["cascade"]
    print(
        f"cascade local models (test): accuracy {cas['accuracy_test']}, agreement with the reference"
        f" {cas['agreement_with_reference_test']}; MACs small {cas['small_macs']}"
        f" cut {cas['backbone_cut_macs']} reference {cas['reference_macs']}"
    )
    for label, run in r["cascade"]["runs"].items():
        live = run["live_at_0.97"]
        print(
            f"cascade {label}: @0.97 saving {live['cost_saving']:.3f} agr {live['agreement']:.3f} tiers {[round(v, 3) for v in live['tier_rates']]} http calls {live['http_calls']} live==replay {live['matches_replay']}"
        )
    print(f"total {r['seconds']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
