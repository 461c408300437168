"""Placing an early-exit model across sites (device / edge / cloud) and what that costs.

The model is cut at its exits into ``E + 1`` stages: stage ``i < E`` is the backbone up to exit
``i`` (from the previous exit), stage ``E`` the rest with the classifier. Each stage runs on a
:class:`Site` with its own price and speed per MAC; exit head ``i`` runs where stage ``i`` runs (it
reads that stage's output). An ``assignment`` gives each stage a site index, never going back
(``(0, 0, 1, 1, 2)``: two stages on the device, two on the edge, the rest in the cloud). Where
consecutive stages sit on different sites, the exit feature between them crosses the
:class:`Link` (s) between, paying per byte and per transfer; the input starts on site 0 and the
answer goes back to it.

A sample leaving at exit ``i`` pays the stages ``0..i``, the heads evaluated on the way, the
transfers of the boundaries it crossed, and the return of its answer. :func:`sample_costs` does this
arithmetic per sample; :func:`evaluate_placement` reports expected cost and latency of a policy
on a recorded stream; :func:`optimise_placement` searches exit subsets and split points for the
cheapest placement whose thresholds (calibrated by Learn-then-Test) keep agreement with the full
model at the target.

Example:
    >>> profile = StageProfile((100, 100, 100), (10, 10), (400, 200), input_bytes=1000, output_bytes=40)
    >>> sites = [Site("device", cost_per_mac=3.0), Site("cloud", cost_per_mac=1.0)]
    >>> links = [Link(cost_per_byte=0.5)]
    >>> path_costs(profile, sites, links, (0, 1, 1)).tolist()  # leave at exit 0, exit 1, the end
    [330.0, 660.0, 760.0]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ..calibration import calibrate_thresholds
from ..errors import ConfigError
from ..routing import gates_open, heads_evaluated, simulate_exits


@dataclass(frozen=True)
class Site:
    """Somewhere a stage can run. Costs are in any one unit (money, energy, ...) used throughout."""

    name: str
    cost_per_mac: float = 0.0
    seconds_per_mac: float = 0.0


@dataclass(frozen=True)
class Link:
    """The connection from site ``k`` to site ``k + 1`` (used both ways)."""

    cost_per_byte: float = 0.0
    seconds_per_byte: float = 0.0
    seconds_per_transfer: float = 0.0  # latency of one hop, whatever its size
    cost_per_transfer: float = 0.0


@dataclass(frozen=True)
class StageProfile:
    """Per-sample sizes of an early-exit model, cut at its exits.

    Attributes:
        stage_macs: ``E + 1`` backbone MACs of each stage (the last includes the classifier).
        head_macs: ``E`` MACs of each exit head.
        activation_bytes: ``E`` bytes of the exit feature a sample carries past each exit.
        input_bytes: bytes of one input.
        output_bytes: bytes of one answer (the logits).
    """

    stage_macs: tuple[int, ...]
    head_macs: tuple[int, ...]
    activation_bytes: tuple[int, ...]
    input_bytes: int
    output_bytes: int

    def __post_init__(self) -> None:
        e = len(self.head_macs)
        if len(self.stage_macs) != e + 1 or len(self.activation_bytes) != e:
            raise ConfigError(
                f"a profile of {e} exits needs {e + 1} stage_macs and {e} activation_bytes, got "
                f"{len(self.stage_macs)} and {len(self.activation_bytes)}"
            )

    @property
    def num_exits(self) -> int:
        return len(self.head_macs)

    @classmethod
    def from_model(cls, eem: object) -> StageProfile:
        """Measure an :class:`~earlyexit.model.EarlyExitModel`: MACs from its exits, activation
        sizes by probing the base model once with one zero input (at its dtype).

        Example:
            >>> profile = StageProfile.from_model(eem)  # doctest: +SKIP
        """
        base = eem.base_model  # type: ignore[attr-defined]
        param = next(base.parameters())
        x = torch.zeros(1, *eem.input_size, dtype=param.dtype, device=param.device)  # type: ignore[attr-defined]
        sizes: dict[str, int] = {}
        handles = []
        for point in eem.exits:  # type: ignore[attr-defined]

            def hook(module, args, output, name=point.name):
                sizes[name] = output.numel() * output.element_size()

            handles.append(base.get_submodule(point.name).register_forward_hook(hook))
        try:
            with torch.no_grad():
                out = base(x)
        finally:
            for h in handles:
                h.remove()
        cum = [*eem.backbone_macs, eem.base_macs]  # type: ignore[attr-defined]
        stages = [cum[0]] + [cum[i] - cum[i - 1] for i in range(1, len(cum))]
        return cls(
            stage_macs=tuple(int(s) for s in stages),
            head_macs=tuple(int(h) for h in eem.head_macs),  # type: ignore[attr-defined]
            activation_bytes=tuple(sizes[p.name] for p in eem.exits),  # type: ignore[attr-defined]
            input_bytes=x.numel() * x.element_size(),
            output_bytes=out.numel() * out.element_size(),
        )


def _check(
    profile: StageProfile, sites: Sequence[Site], links: Sequence[Link], assignment: Sequence[int]
) -> None:
    if len(links) != len(sites) - 1:
        raise ConfigError(f"{len(sites)} sites need {len(sites) - 1} links, got {len(links)}")
    if len(assignment) != profile.num_exits + 1:
        raise ConfigError(
            f"assignment needs one site per stage ({profile.num_exits + 1}), got {len(assignment)}"
        )
    if any(not 0 <= a < len(sites) for a in assignment) or any(
        b < a for a, b in itertools.pairwise(assignment)
    ):
        raise ConfigError(
            f"assignment {tuple(assignment)} must be non-decreasing site indices in 0..{len(sites) - 1}"
        )


def _hop(links: Sequence[Link], a: int, b: int, nbytes: int, latency: bool) -> float:
    """Cost (or seconds) of moving ``nbytes`` from site ``a`` to site ``b`` over the links between."""
    lo, hi = min(a, b), max(a, b)
    total = 0.0
    for link in links[lo:hi]:
        if latency:
            total += link.seconds_per_transfer + nbytes * link.seconds_per_byte
        else:
            total += link.cost_per_transfer + nbytes * link.cost_per_byte
    return total


def _components(
    profile: StageProfile,
    sites: Sequence[Site],
    links: Sequence[Link],
    assignment: Sequence[int],
    latency: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per stage: compute + inbound transfer; per head: compute; per answering stage: return."""
    _check(profile, sites, links, assignment)
    per_mac = [s.seconds_per_mac if latency else s.cost_per_mac for s in sites]
    stage = []
    for i, macs in enumerate(profile.stage_macs):
        site = assignment[i]
        if i == 0:
            inbound = _hop(links, 0, site, profile.input_bytes, latency)
        else:
            inbound = _hop(links, assignment[i - 1], site, profile.activation_bytes[i - 1], latency)
        stage.append(macs * per_mac[site] + inbound)
    heads = [m * per_mac[assignment[i]] for i, m in enumerate(profile.head_macs)]
    back = [_hop(links, assignment[i], 0, profile.output_bytes, latency) for i in range(len(stage))]
    return (
        torch.tensor(stage, dtype=torch.float64),
        torch.tensor(heads, dtype=torch.float64),
        torch.tensor(back, dtype=torch.float64),
        torch.tensor(assignment),
    )


def sample_costs(
    profile: StageProfile,
    sites: Sequence[Site],
    links: Sequence[Link],
    assignment: Sequence[int],
    exit_index: Tensor,
    heads_evaluated: Tensor,
    *,
    latency: bool = False,
) -> Tensor:
    """``[N]`` cost (or, with ``latency``, seconds) of each sample's path.

    Args:
        exit_index: ``[N]`` where each sample left (``E`` = ran to the end).
        heads_evaluated: ``[N, E]`` bool, which heads each sample paid for (only those up to its
            exit count).

    Example:
        >>> p = StageProfile((100, 100), (10,), (400,), input_bytes=0, output_bytes=0)
        >>> sample_costs(p, [Site("a", 1.0)], [], (0, 0), torch.tensor([0, 1]), torch.tensor([[True], [False]])).tolist()
        [110.0, 200.0]
    """
    stage, heads, back, _ = _components(profile, sites, links, assignment, latency)
    e = profile.num_exits
    exit_index = exit_index.long().cpu()
    cum_stage = stage.cumsum(0)
    upto = torch.arange(e)[None, :] <= exit_index[:, None]
    head_paid = (heads_evaluated.cpu().bool() & upto).double() @ heads
    return cum_stage[exit_index] + head_paid + back[exit_index]


def path_costs(
    profile: StageProfile,
    sites: Sequence[Site],
    links: Sequence[Link],
    assignment: Sequence[int],
    evaluated: Sequence[bool] | None = None,
    *,
    latency: bool = False,
) -> Tensor:
    """``[E + 1]`` cost of leaving at each exit (last: the end) when the heads in ``evaluated``
    (default all) run on the way. See the module example."""
    e = profile.num_exits
    mask = torch.tensor([True] * e if evaluated is None else list(evaluated))
    idx = torch.arange(e + 1)
    return sample_costs(
        profile, sites, links, assignment, idx, mask.expand(e + 1, e), latency=latency
    )


@dataclass
class PlacementReport:
    """Expected cost and latency of one placement and policy on a stream."""

    assignment: tuple[int, ...]
    sites: list[str]
    enabled: tuple[bool, ...]
    thresholds: tuple[float, ...]
    expected_cost: float
    expected_latency_s: float
    cost_all_cloud: float  # every sample runs the whole model on the last site, no exits
    cost_saving: float  # 1 - expected_cost / cost_all_cloud
    agreement: float  # with the full model, on the stream evaluated
    exit_rates: list[float]
    macs_share_per_site: list[float]
    bytes_per_sample: float
    path_costs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-serialisable."""
        out = asdict(self)
        out["thresholds"] = [t if math.isfinite(t) else str(t) for t in self.thresholds]
        return out


def _bytes_per_sample(
    profile: StageProfile, assignment: Sequence[int], exit_index: Tensor, links: int
) -> float:
    total = 0.0
    n = exit_index.numel()
    for i in range(profile.num_exits + 1):
        reach = float((exit_index >= i).sum()) / n if n else 0.0
        src = 0 if i == 0 else assignment[i - 1]
        nbytes = profile.input_bytes if i == 0 else profile.activation_bytes[i - 1]
        total += reach * nbytes * abs(assignment[i] - src)
    for i in range(profile.num_exits + 1):
        share = float((exit_index == i).sum()) / n if n else 0.0
        total += share * profile.output_bytes * assignment[i]
    return total


def evaluate_placement(
    profile: StageProfile,
    sites: Sequence[Site],
    links: Sequence[Link],
    assignment: Sequence[int],
    exit_index: Tensor,
    heads_evaluated: Tensor,
    agree: Tensor | None = None,
    *,
    thresholds: Sequence[float] = (),
    enabled: Sequence[bool] | None = None,
) -> PlacementReport:
    """Expected cost and latency of a placement given where each sample of a stream left.

    Args:
        exit_index: ``[N]`` exits (``E`` = the end), e.g. from :func:`simulate_exits`.
        heads_evaluated: ``[N, E]`` which heads each sample paid for.
        agree: ``[N, E]`` whether each head agrees with the full model (for the agreement figure).

    Example:
        >>> rep = evaluate_placement(profile, sites, links, (0, 1, 2), exits, evaluated)  # doctest: +SKIP
    """
    e = profile.num_exits
    cost = sample_costs(profile, sites, links, assignment, exit_index, heads_evaluated)
    secs = sample_costs(
        profile, sites, links, assignment, exit_index, heads_evaluated, latency=True
    )
    cloud = (len(sites) - 1,) * (e + 1)
    all_cloud = float(path_costs(profile, sites, links, cloud, [False] * e)[-1])
    if agree is not None:
        padded = torch.cat([agree.cpu().bool(), torch.ones(agree.shape[0], 1, dtype=torch.bool)], 1)
        agreement = float(padded.gather(1, exit_index.long().cpu()[:, None]).float().mean())
    else:
        agreement = math.nan
    n = exit_index.numel()
    macs_site = [0.0] * len(sites)
    for i in range(e + 1):
        reach = float((exit_index >= i).sum()) / n
        macs_site[assignment[i]] += reach * profile.stage_macs[i]
        if i < e:
            paid = float((heads_evaluated[:, i].cpu() & (exit_index >= i)).sum()) / n
            macs_site[assignment[i]] += paid * profile.head_macs[i]
    total_macs = sum(macs_site) or 1.0
    expected = float(cost.mean())
    return PlacementReport(
        assignment=tuple(int(a) for a in assignment),
        sites=[s.name for s in sites],
        enabled=tuple(enabled) if enabled is not None else tuple([True] * e),
        thresholds=tuple(float(t) for t in thresholds),
        expected_cost=expected,
        expected_latency_s=float(secs.mean()),
        cost_all_cloud=all_cloud,
        cost_saving=1.0 - expected / all_cloud if all_cloud > 0 else math.nan,
        agreement=agreement,
        exit_rates=torch.bincount(exit_index.long().cpu(), minlength=e + 1)
        .double()
        .div(n)
        .tolist(),
        macs_share_per_site=[m / total_macs for m in macs_site],
        bytes_per_sample=_bytes_per_sample(profile, assignment, exit_index.cpu(), len(links)),
        path_costs=path_costs(profile, sites, links, assignment, enabled).tolist(),
    )


def assignments(num_stages: int, num_sites: int) -> list[tuple[int, ...]]:
    """Every non-decreasing assignment of stages to sites (stage 0 may already be off-device).

    Example:
        >>> assignments(2, 2)
        [(0, 0), (0, 1), (1, 1)]
    """
    return list(itertools.combinations_with_replacement(range(num_sites), num_stages))


def heads_paid(num_samples: int, enabled: Sequence[bool], needs_history: bool = False) -> Tensor:
    """``[N, E]`` heads a sample pays for under ``enabled`` gates: the open ones, or with a
    history gate every head up to the last open one."""
    mask = heads_evaluated(enabled, needs_history)
    return torch.tensor(mask, dtype=torch.bool).expand(num_samples, len(mask)).clone()


def optimise_placement(
    profile: StageProfile,
    sites: Sequence[Site],
    links: Sequence[Link],
    scores: Tensor,
    agree: Tensor,
    target: float,
    confidence: float = 0.95,
    *,
    objective: str = "cost",
    max_latency_s: float | None = None,
    holdout: float = 0.5,
    needs_history: bool = False,
    seed: int = 0,
) -> tuple[PlacementReport, list[PlacementReport]]:
    """The cheapest exit subset and split points at the target agreement, on a recorded stream.

    For each subset of exits, thresholds are calibrated (Learn-then-Test, other gates closed) on
    a random ``1 - holdout`` share of the stream; the exits they produce on the held-out share set
    the expected cost of every site assignment. The best by ``objective`` (``"cost"`` or
    ``"latency"``) among those within ``max_latency_s`` expected latency (a service-level
    objective; if none meets it, the fastest) is returned with all candidates (for plots).

    Args:
        scores: ``[N, E]`` gate scores; agree: ``[N, E]`` agreement with the full model.

    Example:
        >>> best, _ = optimise_placement(profile, sites, links, scores, agree, 0.95)  # doctest: +SKIP
        >>> best.assignment, best.enabled  # doctest: +SKIP
    """
    if objective not in ("cost", "latency"):
        raise ConfigError(f"objective must be 'cost' or 'latency', got {objective!r}")
    if not 0.0 < holdout < 1.0:
        raise ConfigError(f"holdout must be in (0, 1), got {holdout}")
    n, e = scores.shape
    if e != profile.num_exits or agree.shape != scores.shape:
        raise ConfigError(
            f"scores and agree must be [N, {profile.num_exits}], got {tuple(scores.shape)}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = round(n * (1.0 - holdout))
    cal, test = perm[:cut], perm[cut:]
    candidates: list[PlacementReport] = []
    for enabled in itertools.product([False, True], repeat=e):
        if any(enabled):
            res = calibrate_thresholds(
                scores[cal], agree[cal], target, confidence, enabled=list(enabled)
            )
            thresholds = res.thresholds
        else:
            thresholds = (math.inf,) * e
        exits = simulate_exits(scores[test], thresholds)
        paid = heads_paid(len(test), gates_open(thresholds), needs_history)
        for assignment in assignments(e + 1, len(sites)):
            candidates.append(
                evaluate_placement(
                    profile,
                    sites,
                    links,
                    assignment,
                    exits,
                    paid,
                    agree[test],
                    thresholds=thresholds,
                    enabled=enabled,
                )
            )
    key = (lambda r: r.expected_cost) if objective == "cost" else (lambda r: r.expected_latency_s)
    feasible = [
        c for c in candidates if max_latency_s is None or c.expected_latency_s <= max_latency_s
    ]
    if not feasible:
        return min(candidates, key=lambda r: r.expected_latency_s), candidates
    return min(feasible, key=key), candidates


__all__ = [
    "Link",
    "PlacementReport",
    "Site",
    "StageProfile",
    "assignments",
    "evaluate_placement",
    "heads_paid",
    "optimise_placement",
    "path_costs",
    "sample_costs",
]
