"""The tiers of a cascade: what runs a batch and what answering each sample cost.

* :class:`LocalTier`: one local model (cost: its MACs per sample unless given);
* :class:`EnsembleTier`: several models whose softmax probabilities are averaged; the agreement
  gate then votes among the members (the cascade-of-ensembles rule);
* :class:`EarlyExitTier`: a wrapped early-exit model (cost: the MACs of each sample's own path).

A model behind an HTTP endpoint is :class:`~earlyexit.cascade.remote.RemoteTier`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..costs.macs import count_macs
from ..errors import ConfigError
from ..model import EarlyExitModel


@dataclass
class TierOutput:
    """What a tier returns for a batch.

    Attributes:
        logits: ``[B, K]`` the tier's answer.
        cost: ``[B]`` float64, what answering each sample cost (in the cascade's cost unit).
        members: for ensembles, each member's ``[B, K]`` logits (the agreement gate votes on them).
    """

    logits: Tensor
    cost: Tensor
    members: list[Tensor] | None = None


class Tier:
    """A stage of a cascade: subclasses implement :meth:`run`."""

    name: str = "tier"

    def run(self, x: Tensor) -> TierOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def _macs_per_sample(model: nn.Module, x: Tensor) -> int:
    return int(count_macs(model, (1, *x.shape[1:])))


class LocalTier(Tier):
    """A local classifier. ``cost`` per sample defaults to its MACs (counted once, at first use).

    Example:
        >>> tier = LocalTier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)))
        >>> out = tier.run(torch.randn(2, 3, 2, 2))
        >>> out.logits.shape, out.cost.tolist()
        (torch.Size([2, 3]), [36.0, 36.0])
    """

    def __init__(self, model: nn.Module, cost: float | None = None, name: str = "local") -> None:
        self.model = model
        self.cost = cost
        self.name = name

    def run(self, x: Tensor) -> TierOutput:
        if self.cost is None:
            self.cost = float(_macs_per_sample(self.model, x))
        with torch.no_grad():
            logits = self.model(x)
        return TierOutput(logits, torch.full((x.shape[0],), float(self.cost), dtype=torch.float64))


class EnsembleTier(Tier):
    """Several models answering together: the mean of their softmax probabilities (as log-probs).

    Example:
        >>> nets = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)) for _ in range(3)]
        >>> out = EnsembleTier(nets).run(torch.randn(2, 3, 2, 2))
        >>> len(out.members), out.cost.tolist()
        (3, [108.0, 108.0])
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        costs: Sequence[float] | None = None,
        name: str = "ensemble",
    ) -> None:
        if len(models) == 0:
            raise ConfigError("an ensemble tier needs at least one model")
        if costs is not None and len(costs) != len(models):
            raise ConfigError(f"got {len(costs)} costs for {len(models)} ensemble members")
        self.members = [
            LocalTier(m, None if costs is None else costs[i]) for i, m in enumerate(models)
        ]
        self.name = name

    def run(self, x: Tensor) -> TierOutput:
        outs = [m.run(x) for m in self.members]
        members = [o.logits for o in outs]
        probs = torch.stack([m.float().softmax(dim=-1) for m in members]).mean(dim=0)
        logits = probs.clamp_min(1e-12).log().to(members[0].dtype)
        return TierOutput(logits, sum(o.cost for o in outs), members)


class EarlyExitTier(Tier):
    """A wrapped early-exit model; each sample costs the MACs of the path it took.

    Example:
        >>> tier = EarlyExitTier(ee.wrap(model))  # doctest: +SKIP
    """

    def __init__(
        self, eem: EarlyExitModel, cost_per_mac: float = 1.0, name: str = "early_exit"
    ) -> None:
        self.eem = eem
        self.cost_per_mac = float(cost_per_mac)
        self.name = name

    def run(self, x: Tensor) -> TierOutput:
        res = self.eem.predict(x)
        paths = torch.tensor(self.eem.path_macs(), dtype=torch.float64)
        return TierOutput(res.logits, paths[res.exit_index.cpu()] * self.cost_per_mac)


__all__ = ["EarlyExitTier", "EnsembleTier", "LocalTier", "Tier", "TierOutput"]
