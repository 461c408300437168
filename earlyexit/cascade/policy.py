"""The cascade policy: tiers of whole models, cheapest first, each answer kept when trusted.

A request runs on tier 0; if the cascade's gate trusts that tier's answer (score >= threshold, the
rule of :mod:`earlyexit.routing`) it leaves, otherwise it goes on to the next, bigger tier. The
last tier answers everything that reaches it, and the final supervisor watches its answers exactly
as on an :class:`~earlyexit.model.EarlyExitModel`. The result is the same
:class:`~earlyexit.model.ExitResult`, with ``exit_index`` = the tier that answered.

:meth:`Cascade.record` runs every tier on a batch of evidence, :meth:`Cascade.calibrate` picks
thresholds with :func:`~earlyexit.calibration.calibrate_thresholds` so that agreement with the
last tier stays above a target, and :meth:`Cascade.simulate` replays a policy on recorded evidence.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..calibration import CalibrationResult, calibrate_thresholds
from ..errors import ConfigError, InputError
from ..gates import Gate, GateContext, make_gate
from ..model import EarlyExitModel, ExitResult
from ..routing import check_thresholds, leaves, scatter_answers, simulate_exits
from ..supervisors import Supervisor, make_supervisor
from .tiers import EarlyExitTier, EnsembleTier, LocalTier, Tier


@dataclass
class CascadeRecord:
    """Every tier's answer on every evidence sample (for calibration and offline curves).

    Attributes:
        logits: ``[N, T, K]`` each tier's logits.
        scores: ``[N, T]`` the cascade gate's score of each tier's answer, with the earlier tiers as
            history (as serving computes it).
        cost: ``[N, T]`` float64 per-sample cost of each tier.
        labels: ``[N]`` labels when known (for accuracy), else ``None``.
    """

    logits: Tensor
    scores: Tensor
    cost: Tensor
    labels: Tensor | None = None

    def agree(self) -> Tensor:
        """``[N, T]`` bool: tier ``t``'s argmax equals the last tier's."""
        pred = self.logits.argmax(dim=-1)
        return pred == pred[:, -1:]

    def cumulative_cost(self) -> Tensor:
        """``[N, T]`` float64: what a sample that stops at each tier has paid (every tier run on
        the way included)."""
        return self.cost.cumsum(dim=1)


@dataclass
class CascadeStats:
    """Running totals of what a cascade served."""

    samples: int = 0
    answered: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)
    cost: float = 0.0
    seconds: list[float] = field(default_factory=list)


class Cascade:
    """Tiers of whole models, cheapest first; each tier's answer is kept when the gate trusts it.

    Args:
        tiers: :class:`Tier` objects (a bare ``nn.Module`` becomes a :class:`LocalTier`, an
            :class:`EarlyExitModel` an :class:`EarlyExitTier`, a list of modules an
            :class:`EnsembleTier`).
        gate: a gate name, config or object (as for ``wrap``); ``needs_history`` gates see the
            earlier tiers' logits, the agreement gate votes among an ensemble's members.
        supervisor: the final supervisor on the last tier's answers (name or object).
        thresholds: one per tier but the last; default all closed (``inf``): the last tier answers
            everything until thresholds are set or calibrated.

    Example:
        >>> small = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> big = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> cascade = Cascade([small, big], thresholds=[0.0])  # tier 0 answers all
        >>> cascade.predict(torch.randn(4, 3, 2, 2)).exit_index.tolist()
        [0, 0, 0, 0]
    """

    def __init__(
        self,
        tiers: Sequence[Tier | nn.Module | Sequence[nn.Module]],
        gate: str | Gate | dict = "max_softmax",
        supervisor: str | Supervisor | None = None,
        thresholds: Sequence[float] | None = None,
    ) -> None:
        self.tiers: list[Tier] = [self._as_tier(t, i) for i, t in enumerate(tiers)]
        if len(self.tiers) < 1:
            raise ConfigError("a cascade needs at least one tier")
        self.gate = make_gate(gate)
        self.supervisor = make_supervisor(supervisor)
        self._thresholds: tuple[float, ...] = (math.inf,) * (len(self.tiers) - 1)
        if thresholds is not None:
            self.set_thresholds(thresholds)
        self.stats = CascadeStats(
            answered=[0] * len(self.tiers),
            reached=[0] * len(self.tiers),
            seconds=[0.0] * len(self.tiers),
        )

    @staticmethod
    def _as_tier(tier: object, index: int) -> Tier:
        if isinstance(tier, Tier):
            return tier
        if isinstance(tier, EarlyExitModel):
            return EarlyExitTier(tier, name=f"tier{index}")
        if isinstance(tier, nn.Module):
            return LocalTier(tier, name=f"tier{index}")
        if isinstance(tier, (list, tuple)) and all(isinstance(m, nn.Module) for m in tier):
            return EnsembleTier(list(tier), name=f"tier{index}")
        raise ConfigError(
            f"tier {index} must be a Tier, an nn.Module, an EarlyExitModel or a list of modules, "
            f"got {type(tier).__name__}"
        )

    @property
    def num_tiers(self) -> int:
        """Number of tiers (the last one answers whatever reaches it)."""
        return len(self.tiers)

    @property
    def thresholds(self) -> tuple[float, ...]:
        """One gate threshold per tier but the last (``inf`` = always go on)."""
        return self._thresholds

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """Set every tier's threshold (``inf``: never stop there; ``-inf``: always stop there)."""
        self._thresholds = check_thresholds(thresholds, self.num_tiers - 1, per="tier but the last")

    # -------------------------------------------------------------- serving
    def predict(self, x: Tensor) -> ExitResult:
        """Serve a batch; ``exit_index`` is the tier that answered each sample.

        The final supervisor's policy (flag / raise / fallback) applies to the last tier's answers.
        Per-sample costs of this call are left in ``self.last_cost``.
        """
        result, cost = self._serve(x)
        self.last_cost = cost
        if self.supervisor is not None:
            result = self.supervisor.enforce(x, result)
        return result

    __call__ = predict

    def _serve(self, x: Tensor) -> tuple[ExitResult, Tensor]:
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise InputError(
                f"expected a batch tensor [B, ...], got {getattr(x, 'shape', type(x))}"
            )
        batch = x.shape[0]
        cost = torch.zeros(batch, dtype=torch.float64)
        rows = torch.arange(batch, device=x.device)
        history: list[Tensor | None] = []
        answers: list[tuple[Tensor, Tensor, int, Tensor]] = []
        accepted = torch.ones(batch, dtype=torch.bool, device=x.device)
        last = self.num_tiers - 1
        for t, tier in enumerate(self.tiers):
            if rows.numel() == 0:
                break
            start = time.perf_counter()
            out = tier.run(x[rows])
            self.stats.seconds[t] += time.perf_counter() - start
            self.stats.reached[t] += int(rows.numel())
            cost[rows.cpu()] += out.cost
            scores = self.gate.score(
                out.logits, GateContext(t, rows, history, members=out.members)
            ).float()
            if t == last:
                leave = torch.ones_like(scores, dtype=torch.bool)
                if self.supervisor is not None:
                    accepted[rows] = self.supervisor.accept(out.logits)
            else:
                leave = leaves(scores, self._thresholds[t])
            if bool(leave.any()):
                answers.append((rows[leave], out.logits[leave], t, scores[leave]))
                self.stats.answered[t] += int(leave.sum())
            keep = ~leave
            rows = rows[keep]
            history = [h[keep] for h in [*history, out.logits]]
        self.stats.samples += batch
        self.stats.cost += float(cost.sum())
        if not answers:
            raise InputError("an empty batch has no answers; serve at least one sample")
        logits, exit_index, confidence = scatter_answers(
            answers,
            batch,
            num_classes=answers[0][1].shape[1],
            dtype=answers[0][1].dtype,
            device=x.device,
        )
        return ExitResult(logits, exit_index, confidence, accepted), cost

    # -------------------------------------------------------------- evidence and calibration
    def record(self, x: Tensor, labels: Tensor | None = None) -> CascadeRecord:
        """Run *every* tier on every sample of ``x`` (evidence for calibration and curves).

        Example:
            >>> rec = cascade.record(x_audit)  # doctest: +SKIP
            >>> cascade.calibrate(rec, target=0.99)  # doctest: +SKIP
        """
        rows = torch.arange(x.shape[0], device=x.device)
        logits, scores, costs, history = [], [], [], []
        for t, tier in enumerate(self.tiers):
            out = tier.run(x)
            scores.append(
                self.gate.score(
                    out.logits, GateContext(t, rows, list(history), out.members)
                ).float()
            )
            history.append(out.logits)
            logits.append(out.logits.float())
            costs.append(out.cost)
        return CascadeRecord(
            torch.stack(logits, dim=1),
            torch.stack(scores, dim=1).cpu(),
            torch.stack(costs, dim=1),
            labels,
        )

    def calibrate(
        self, record: CascadeRecord, target: float, confidence: float = 0.95, **kwargs: object
    ) -> CalibrationResult:
        """Thresholds so that agreement with the last tier among samples that stop early is at
        least ``target`` with ``confidence`` (Learn-then-Test, as for early exits); sets them.

        Example:
            >>> cascade.calibrate(cascade.record(x_audit), target=0.98)  # doctest: +SKIP
        """
        if self.num_tiers < 2:
            raise ConfigError("a one-tier cascade has nothing to calibrate")
        agree = record.agree()[:, :-1]
        result = calibrate_thresholds(record.scores[:, :-1], agree, target, confidence, **kwargs)
        self.set_thresholds(result.thresholds)
        return result

    def simulate(self, record: CascadeRecord, thresholds: Sequence[float] | None = None) -> dict:
        """Replay a policy on recorded evidence: where each sample stops, cost, agreement.

        Returns a dict with ``exit_index`` ``[N]``, ``cost`` (mean per sample), ``cost_saving``
        (vs running only the last tier), ``agreement`` (with the last tier), ``tier_rates`` and,
        with labels, ``accuracy``.

        Example:
            >>> cascade.simulate(rec, [0.9])["cost_saving"]  # doctest: +SKIP
        """
        thr = self._thresholds if thresholds is None else tuple(float(t) for t in thresholds)
        n, tiers = record.scores.shape
        # The last tier answers whatever reaches it: routing over the others, "ran to the end"
        # (index tiers - 1) is the last tier.
        stop = simulate_exits(record.scores[:, :-1], thr)
        paid = record.cumulative_cost().gather(1, stop[:, None]).squeeze(1)
        pred = record.logits.argmax(-1).gather(1, stop[:, None]).squeeze(1)
        final = record.logits[:, -1].argmax(-1)
        last_only = float(record.cost[:, -1].mean())
        out = {
            "exit_index": stop,
            "cost": float(paid.mean()),
            "cost_saving": 1.0 - float(paid.mean()) / last_only if last_only > 0 else math.nan,
            "agreement": float((pred == final).float().mean()),
            "tier_rates": torch.bincount(stop, minlength=tiers).float().div(n).tolist(),
        }
        if record.labels is not None:
            out["accuracy"] = float((pred == record.labels).float().mean())
            out["accuracy_last"] = float((final == record.labels).float().mean())
        return out


__all__ = ["Cascade", "CascadeRecord", "CascadeStats"]
