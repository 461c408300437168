"""Evidence for the seeds: gates, final supervisor, cascades, placement and data cartography.

One stream, one script. It prints a summary and writes ``seeds.json`` and PNG figures under
``benchmarks/results/`` (or ``--out``).

The stream. The project's digits workload (``earlyexit.evaluation.workloads``) is used when it is
importable with ``load_workload("digits")``; otherwise a stand-in that is described here in full:
scikit-learn's bundled handwritten digits (1797 8x8 grey images, 10 classes), upsampled to 32x32
and repeated to 3 channels. A timm ``resnet18`` (random init, 10 classes) is trained on 600 of the
images for a few epochs: that is the "pretrained" reference model. The other 1197 images, each in
3 variants (the original and two shifted by up to 2 pixels with a little noise), are the traffic:
split *by original image* into a head-training part (the exit heads learn from it by
self-distillation, and its training dynamics give the data map), a calibration part and a test part.
All reported figures are on the test part unless said otherwise.

Run: ``python benchmarks/seeds.py [--out DIR] [--quick]``.
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
from earlyexit.cascade import Cascade, EnsembleTier, LocalTier, ModelServer, RemoteTier  # noqa: E402
from earlyexit.evaluation.macs import count_macs  # noqa: E402
from earlyexit.gates import gate_names, gate_scores, make_gate  # noqa: E402
from earlyexit.placement import (  # noqa: E402
    Link,
    Site,
    StageProfile,
    evaluate_placement,
    heads_paid,
    optimise_placement,
    sample_costs,
    simulate_exits,
)
from earlyexit.supervisors import (  # noqa: E402
    Supervisor,
    accepted_accuracy_curve,
    auroc,
    right_predictions,
)

TARGETS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
CONFIDENCE = 0.9


# ---------------------------------------------------------------------------- the stream
@dataclass
class Stream:
    description: str
    x: Tensor  # [N, 3, 32, 32] traffic
    y: Tensor  # [N] labels (for accuracy only)
    split: Tensor  # [N] 0 head training, 1 calibration, 2 test
    reference: nn.Module  # the large model (eval mode)
    x_train: Tensor  # what the reference and the small models were trained on
    y_train: Tensor


def _prepare(images: Tensor) -> Tensor:
    x = images.float().view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).repeat(1, 3, 1, 1)


def _variant(x: Tensor, g: torch.Generator) -> Tensor:
    shifts = torch.randint(-2, 3, (x.shape[0], 2), generator=g)
    out = torch.stack(
        [
            torch.roll(xi, (int(s[0]), int(s[1])), dims=(1, 2))
            for xi, s in zip(x, shifts, strict=True)
        ]
    )
    return out + 0.1 * torch.randn(out.shape, generator=g)


def train_classifier(
    model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float, seed: int
) -> nn.Module:
    """Plain supervised training (the reference models are someone else's pretrained models)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=g)
        for start in range(0, x.shape[0], 64):
            idx = order[start : start + 64]
            xb = _variant(x[idx], g)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def build_stream(quick: bool) -> Stream:
    try:  # the project's workload, when it exists on this branch
        from earlyexit.evaluation.workloads import load_workload  # type: ignore[attr-defined]

        wl = load_workload("digits")
        raise NotImplementedError(f"adapt to {type(wl).__name__}")  # pragma: no cover
    except (ImportError, NotImplementedError):
        pass
    import timm
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images)
    labels = torch.tensor(digits.target).long()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(labels), generator=g)
    train_idx, stream_idx = perm[:600], perm[600:]
    x_all = _prepare(images)
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False, num_classes=10)
    train_classifier(reference, x_all[train_idx], labels[train_idx], 3 if quick else 8, 2e-3, 0)
    base = x_all[stream_idx]
    copies = [base, _variant(base, g), _variant(base, g)]
    x = torch.cat(copies)
    y = labels[stream_idx].repeat(3)
    owner = torch.arange(len(stream_idx)).repeat(3)
    part = torch.randperm(len(stream_idx), generator=g) % 10  # by original image: 40/30/30
    split = torch.where(part[owner] < 4, 0, torch.where(part[owner] < 7, 1, 2))
    return Stream(
        "stand-in: sklearn digits 8x8 -> 32x32x3; timm resnet18 trained on 600 images; traffic = "
        "the other 1197 images x 3 variants (original + 2 shifted/noisy), split by image 40/30/30 "
        "into head training / calibration / test",
        x,
        y,
        split,
        reference,
        x_all[train_idx],
        labels[train_idx],
    )


def small_cnn(seed: int, width: int = 8) -> nn.Module:
    """A cheap local model: two strided convs and a linear layer (~0.1-0.5 MMACs at 32x32)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * width, 10),
    )


@torch.no_grad()
def batched(fn, x: Tensor, size: int = 256) -> Tensor:
    return torch.cat([fn(chunk) for chunk in x.split(size)])


# ---------------------------------------------------------------------------- early exits
def build_early_exits(stream: Stream, epochs: int) -> dict:
    eem = ee.wrap(stream.reference, input_size=(3, 32, 32), head="linear")
    num_exits = eem.num_exits
    zs: list[list[Tensor]] = [[] for _ in range(num_exits)]
    finals = []
    for chunk in stream.x.split(256):
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
def section_cascade(stream: Stream, out: Path, quick: bool) -> dict:
    epochs = 10 if quick else 30

    def trained(seed: int, width: int) -> nn.Module:
        model = small_cnn(seed, width)
        return train_classifier(model, stream.x_train, stream.y_train, epochs, 5e-3, seed)

    smalls = [trained(s, 8) for s in (1, 2)]
    mediums = [trained(s, 16) for s in (3, 4, 5)]
    ref_macs = count_macs(stream.reference, (1, 3, 32, 32))
    small_macs = count_macs(smalls[0], (1, 3, 32, 32))
    medium_macs = count_macs(mediums[0], (1, 3, 32, 32))
    accuracy = {
        "small": float((batched(smalls[0], stream.x).argmax(-1) == stream.y).float().mean()),
        "medium": float((batched(mediums[0], stream.x).argmax(-1) == stream.y).float().mean()),
    }
    cal, test = stream.split == 1, stream.split == 2
    results: dict = {
        "reference_macs": ref_macs,
        "small_macs": small_macs,
        "medium_macs": medium_macs,
        "accuracy_all_traffic": accuracy,
        "remote_cost": "per sample: the reference's MACs; per call: 1e6 (MAC-equivalents)",
        "runs": {},
    }
    with ModelServer(stream.reference, max_requests=10_000, lifetime=1800) as server:
        remote = RemoteTier(
            server.url,
            cost_per_sample=float(ref_macs),
            cost_per_call=1e6,
            max_batch=256,
            timeout=30.0,
        )
        setups = {
            "small -> remote (max_softmax, BiSupervised)": Cascade(
                [LocalTier(smalls[0]), remote], gate="max_softmax"
            ),
            "ensemble(2 small) -> ensemble(3 medium) -> remote (agreement, CoE)": Cascade(
                [EnsembleTier(smalls), EnsembleTier(mediums), remote], gate="agreement"
            ),
            "same, agreement x max_softmax": Cascade(
                [EnsembleTier(smalls), EnsembleTier(mediums), remote],
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
SLO_S = 0.03  # expected latency objective for the placement search
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
    # Does the map line up with the heads' later behaviour? Agreement of exit 0 by region.
    agree = head_logits.argmax(-1) == final.argmax(-1)[:, None]
    by_region = {
        REGION_NAMES[r]: float(agree[train][regions == r].float().mean())
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
        "router_auroc_hard_vs_answerable_test": router_auroc,
        "assignment": assignment,
        "curves": points,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--quick", action="store_true", help="fewer training epochs (smoke run)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    stream = build_stream(args.quick)
    print(f"stream: {stream.description}; {len(stream.y)} samples", flush=True)
    ex = build_early_exits(stream, epochs=4 if args.quick else 10)
    print(f"exits: {[p.name for p in ex['eem'].exits]}", flush=True)
    report: dict = {
        "stream": stream.description,
        "samples": len(stream.y),
        "split_sizes": torch.bincount(stream.split).tolist(),
    }
    report["gates"] = section_gates(stream, ex, out)
    report["supervisor"] = section_supervisor(stream, ex, out)
    report["placement"] = section_placement(stream, ex, out)
    ex["assignment"] = tuple(report["placement"]["best"]["assignment"])
    report["cartography"] = section_cartography(stream, ex, out)
    report["cascade"] = section_cascade(stream, out, args.quick)
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
            f"  {label:28s} saving {a['mac_saving']:.3f} agr {a['agreement']:.3f} | saving {b['mac_saving']:.3f} agr {b['agreement']:.3f}"
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
    print(
        f"router AUROC (hard vs answerable early, test): {c['router_auroc_hard_vs_answerable_test']:.3f}"
    )
    for label, pts in c["curves"].items():
        at = {p["target"]: p for p in pts}[0.95]
        print(
            f"  {label:24s} @0.95: agr {at['agreement']:.3f} MAC saving {at['mac_saving']:.3f} placement saving {at['placement_cost_saving']:.3f} routed {at['routed_share']:.3f}"
        )
    for label, run in r["cascade"]["runs"].items():
        live = run["live_at_0.97"]
        print(
            f"cascade {label}: @0.97 saving {live['cost_saving']:.3f} agr {live['agreement']:.3f} tiers {[round(v, 3) for v in live['tier_rates']]} http calls {live['http_calls']} live==replay {live['matches_replay']}"
        )
    print(f"total {r['seconds']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
