"""Policy calibration: from held-out evidence, heads and a gate to a :class:`Candidate` policy.

The heads' scores on the evidence are recomputed (heads change, so stored scores would be stale),
exits that save nothing are switched off (decided on every 4th evidence row), and thresholds are
chosen by Learn-then-Test (``guarantee="high_probability"``) or by conformal risk control
(``guarantee="expected"``, see :mod:`earlyexit.calibration`) on the other rows, tested once. The
result is a :class:`Candidate`: heads and the thresholds calibrated for exactly those heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import expect_dict, expect_int, expect_list, expect_str, field_error
from ..calibration import (
    TOLERATED_FAILURES,
    CalibrationResult,
    calibrate_joint,
    calibrate_risk_control,
    calibrate_thresholds,
    empirical_joint_thresholds,
    min_evidence,
    risk_control_min_evidence,
)
from ..errors import ConfigError
from ..gates import Gate, GateContext, LearnedGate
from ..head_timing import measure_head_time_fractions
from ..model import EarlyExitModel
from ..routing import exit_path_macs, gates_open, heads_evaluated, simulate_exits
from .config import DistillConfig
from .trainer import agreement, classify_all

#: Every this-many-th evidence row chooses which exits stay on; the others test the thresholds.
SELECT_EVERY = 4


class ExitState(str, Enum):
    """What an exit does now (its ``"state"`` in ``OnlineDistiller.stats()["exits"]``)."""

    OPEN = "open"
    CLOSED = "closed"
    SWITCHED_OFF = "switched off"

    def __str__(self) -> str:
        return self.value


#: What an exit report may hold (``state`` and ``reason`` always) and the JSON types of each.
REPORT_FIELDS: dict[str, tuple[type, ...]] = {
    "state": (str,),
    "reason": (str,),
    "evidence_reached": (int,),
    "evidence_exiting": (int,),
    "evidence_agreement": (int, float),
    "evidence_lower_bound": (int, float),
    "expected_exit_rate": (int, float),
    "gate": (str,),
}


def check_reports(reports: Any, num_exits: int) -> None:
    """Check saved exit reports: one per exit, each with a known ``state``, a ``reason`` and
    only the known keys, of their JSON types (numbers may be NaN: no evidence exited). Raises a
    :class:`~earlyexit.CheckpointError` naming the field.

    Example:
        >>> check_reports([{"state": "closed", "reason": "warm-up"}], num_exits=1)
    """
    for e, report in enumerate(expect_list(reports, "reports", num_exits)):
        where = f"reports[{e}]"
        expect_dict(report, where, ("state", "reason"), tuple(REPORT_FIELDS))
        expect_str(report["state"], f"{where}.state", tuple(s.value for s in ExitState))
        for key, value in report.items():
            types = REPORT_FIELDS[key]
            if isinstance(value, bool) or not isinstance(value, types):
                names = " or ".join(t.__name__ for t in types)
                raise field_error(f"{where}.{key}", f"a {names}", value)
            if types == (int,):
                expect_int(value, f"{where}.{key}")


def typed_report(report: dict[str, Any]) -> dict[str, Any]:
    """An exit report read from JSON, with its ``"state"`` as an :class:`ExitState` again."""
    return {**report, "state": ExitState(report["state"])}


@dataclass
class Candidate:
    """Heads and the thresholds calibrated for exactly those heads, ready to be published.

    ``reports`` says, per exit, its :class:`ExitState`, why, and what the evidence showed;
    ``epoch`` is the drift epoch of the evidence (a candidate from a voided epoch is dropped).
    """

    heads: nn.ModuleList
    gate: Gate
    thresholds: tuple[float, ...]
    reports: list[dict[str, Any]]
    expected_mac_saving: float
    evidence: int
    epoch: int


def score_logits(gate: Gate, logits: Sequence[Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
    """Gate scores ``[N, E]`` of every exit's ``logits`` as served (logits that are not finite
    score NaN and let nothing out), and whether each agrees with the full model's ``labels``.

    Example:
        >>> from earlyexit.gates import make_gate
        >>> s, a = score_logits(make_gate("max_softmax"), [torch.zeros(2, 3)], torch.tensor([0, 1]))
        >>> s.shape, a.tolist()
        (torch.Size([2, 1]), [[True], [False]])
    """
    rows = torch.arange(labels.shape[0], device=labels.device)
    with torch.no_grad():
        scores = [
            gate.checked_score(out, GateContext(i, rows, logits[:i])).cpu()
            for i, out in enumerate(logits)
        ]
    return torch.stack(scores, dim=1), agreement(logits, labels).cpu()


class PolicyCalibrator:
    """Turns held-out evidence into a :class:`Candidate` for ``eem`` (whose costs it reads).

    Nothing to save. It remembers the last heads' logits on the evidence (see
    :meth:`evidence_logits`), so that recalibrating unchanged heads costs the new rows only.

    Example:
        >>> calibrator = PolicyCalibrator(eem, DistillConfig())  # doctest: +SKIP
        >>> candidate = calibrator.candidate(heads, gate, note, evidence, epoch=0)  # doctest: +SKIP
        >>> candidate.thresholds  # doctest: +SKIP
    """

    def __init__(self, eem: EarlyExitModel, config: DistillConfig) -> None:
        self.eem = eem
        self.config = config
        # (heads version, rows ever written) and the logits of every stored row, storage order.
        self._scored: tuple[tuple[Any, int], list[Tensor]] | None = None
        # head_cost="time": per exit, head + gate time as a share of the base model's (batch 1).
        self.head_time_fractions: tuple[float, ...] | None = config.head_time_fractions

    def evidence_needed(self) -> int:
        """Fewest evidence rows the most lenient test needs: below it nothing can open (under
        ``guarantee="expected"``, CRC's ``1 / (1 - target) - 1``)."""
        cfg = self.config
        if cfg.guarantee == "expected":
            return risk_control_min_evidence(cfg.target_agreement)
        return min_evidence(cfg.target_agreement, 1.0 - cfg.confidence, TOLERATED_FAILURES)

    def closed(self, have: int, epoch: int) -> Candidate:
        """The candidate while evidence is short: the served heads and gate, every gate closed."""
        num_exits = self.eem.num_exits
        reason = f"closed: {have} evidence samples, {self.evidence_needed()} needed"
        if self.config.guarantee == "expected":
            reason += " (expected)"
        reports = [{"state": ExitState.CLOSED, "reason": reason} for _ in range(num_exits)]
        return Candidate(
            self.eem.heads, self.eem.gate, (math.inf,) * num_exits, reports, 0.0, 0, epoch
        )

    def candidate(
        self,
        heads: nn.ModuleList,
        gate: Gate,
        gate_note: str,
        evidence: dict[str, Tensor],
        epoch: int,
        rows_key: tuple[Any, int, int] | None = None,
    ) -> Candidate:
        """Choose which exits pay on a quarter of ``evidence``, then calibrate ``heads`` under
        ``gate`` on the rest (``evidence``: ``z0 .. z{E-1}`` and the teacher's labels, the
        evidence ring's rows in storage order; ``rows_key``: see :meth:`evidence_logits`)."""
        cfg = self.config
        num_exits = self.eem.num_exits
        need = self.evidence_needed()
        logits = self.evidence_logits(heads, evidence, rows_key)
        scores, agree = self.score_evidence(heads, gate, evidence, logits)
        # Exits are chosen on every SELECT_EVERY-th evidence row and the rest tests the thresholds
        # once: testing several exit sets on the same rows and serving the cheapest would spend
        # the confidence level once per set. The split depends only on row positions and counts.
        enabled, switched = [True] * num_exits, {}
        rows = torch.arange(scores.shape[0])
        choose = rows % SELECT_EVERY == 0
        if cfg.auto_switch_off and int((~choose).sum()) >= need:
            enabled, switched = self.select_exits(scores[choose], agree[choose], gate)
            if switched and isinstance(gate, LearnedGate) and gate.needs_history:
                # Serve without the switched-off heads: the look-back skips them, and the
                # thresholds are tested on the scores exactly as served.
                gate = gate.reading(enabled)
                scores, agree = self.score_evidence(heads, gate, evidence, logits)
            scores, agree = scores[~choose], agree[~choose]
        result = self.calibrate(scores, agree, enabled)
        cost = self.expected_cost(scores, result.thresholds, gate)
        base = float(self.eem.base_macs)
        where = simulate_exits(scores, list(result.thresholds))
        n = max(int(where.numel()), 1)
        reports = []
        for e, detail in enumerate(result.exits):
            report = {
                "state": ExitState.OPEN if detail.threshold < math.inf else ExitState.CLOSED,
                "reason": switched.get(e, detail.reason),
                "evidence_reached": detail.reached,
                "evidence_exiting": detail.exiting,
                "evidence_agreement": detail.agreement,
                "evidence_lower_bound": detail.lower_bound,
                "expected_exit_rate": float((where == e).sum()) / n,
                "gate": gate_note,
            }
            if e in switched:
                report["state"] = ExitState.SWITCHED_OFF
            reports.append(report)
        saving = 1.0 - cost / base
        return Candidate(
            heads, gate, result.thresholds, reports, saving, int(scores.shape[0]), epoch
        )

    def evidence_logits(
        self,
        heads: nn.ModuleList,
        data: dict[str, Tensor],
        rows_key: tuple[Any, int, int] | None = None,
    ) -> list[Tensor]:
        """Every head's logits on the evidence rows ``data`` (a ring's rows in storage order).

        ``rows_key`` = (heads version, the ring's next write slot, rows ever written to it): when
        the heads version is the last call's, only the rows written since are scored (the
        others are where they were, with the logits computed then). Rescoring every row is most
        of a calibration's cost, and a learner that has not trained since its last calibration
        recalibrates the same heads on a little more evidence. Without a key every row is scored.

        Example:
            >>> logits = calibrator.evidence_logits(heads, evidence, (7, 120, 120))  # doctest: +SKIP
        """
        zs = [data[f"z{i}"] for i in range(len(heads))]
        n = int(data["teacher"].shape[0])
        cached, self._scored = self._scored, None
        written: Tensor | None = None
        if rows_key is not None and cached is not None and cached[0][0] == rows_key[0]:
            (_, added_then), old = cached
            _, head, added = rows_key
            new = added - added_then
            if 0 <= new < n and old[0].shape[0] <= n and old[0].shape[0] + new >= n:
                # The ring fills in order, then wraps: the rows written since are the ``new``
                # slots before the next write slot; every other row was scored last time.
                written = (head - new + torch.arange(new)) % n
        if written is None:
            logits = classify_all(heads, zs)
        else:
            fresh = classify_all(heads, [z[written.to(z.device)] for z in zs])
            logits = []
            for before, now in zip(old, fresh, strict=True):
                out = torch.empty((n, *before.shape[1:]), dtype=now.dtype, device=now.device)
                out[: before.shape[0]] = before
                out[written.to(out.device)] = now
                logits.append(out)
        if rows_key is not None:
            self._scored = ((rows_key[0], rows_key[2]), logits)
        return logits

    def score_evidence(
        self,
        heads: nn.ModuleList,
        gate: Gate,
        data: dict[str, Tensor],
        logits: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Gate scores ``[N, E]`` and agreement ``[N, E]`` of ``heads`` on stored evidence
        (``logits``: the heads' logits on it, when already known)."""
        if logits is None:
            logits = classify_all(heads, [data[f"z{i}"] for i in range(len(heads))])
        return score_logits(gate, logits, data["teacher"])

    def expected_cost(self, scores: Tensor, thresholds: Sequence[float], gate: Gate) -> float:
        """Mean MACs per sample of serving ``scores`` at ``thresholds`` (heads and gate included)."""
        where = simulate_exits(scores, list(thresholds))
        path = torch.tensor(self.eem.path_macs(tuple(thresholds), gate=gate), dtype=torch.float64)
        return float(path[where].mean()) if where.numel() else float(path[-1])

    def calibrate(self, scores: Tensor, agree: Tensor, enabled: list[bool]) -> CalibrationResult:
        """Thresholds by Learn-then-Test: one shared threshold with agreement pooled over exits
        (``"joint"``), or one per exit, each guaranteed (``"per_exit"``); under
        ``guarantee="expected"``, one shared threshold by conformal risk control (no search over
        exit subsets: choosing among several paths on the same rows would void the bound)."""
        cfg = self.config
        if cfg.guarantee == "expected":
            return calibrate_risk_control(scores, agree, cfg.target_agreement, enabled=enabled)
        if cfg.calibration_mode == "joint":
            return calibrate_joint(
                scores, agree, cfg.target_agreement, cfg.confidence, enabled=enabled
            )
        return calibrate_thresholds(
            scores,
            agree,
            cfg.target_agreement,
            cfg.confidence,
            method=cfg.calibration_method,
            enabled=enabled,
        )

    def select_exits(
        self, scores: Tensor, agree: Tensor, gate: Gate
    ) -> tuple[list[bool], dict[int, str]]:
        """Automatic exit selection: which exits pay for their heads, and why the others do not.

        Greedy on the evidence rows set aside for choosing (never those tested next): put every
        exit still on at the most lenient shared threshold whose agreement on these rows meets the
        target (among early answers; among all answers under ``guarantee="expected"``), drop the
        open exit whose removal saves the most (or that saves nothing), repeat. A path is priced as
        served without the exits dropped so far (their heads do not run, a learned gate's look-back
        skips them), each head at :meth:`selection_head_costs`: MACs, or measured time with
        ``head_cost="time"``. A point estimate suffices here: the guarantee comes from the test
        that follows.
        """
        num_exits = self.eem.num_exits
        enabled = [True] * num_exits
        switched: dict[int, str] = {}
        target = self.config.target_agreement
        # Judge each exit set by what the guarantee in force counts.
        among = "all" if self.config.guarantee == "expected" else "early"
        unit = "MACs" if self.config.head_cost == "macs" else "time-equivalent MACs"

        head_costs = self.selection_head_costs(gate)

        def cost_of(trial: list[bool]) -> tuple[tuple[float, ...], float]:
            thresholds = empirical_joint_thresholds(
                scores, agree, target, enabled=trial, among=among
            )
            # Priced as served with ``trial``: a switched-off head is not read by the gate.
            served = gate.reading(trial) if isinstance(gate, LearnedGate) else gate
            evaluated = heads_evaluated(gates_open(thresholds), served.history_sources(num_exits))
            eem = self.eem
            path = exit_path_macs(eem.backbone_macs, head_costs, eem.base_macs, evaluated)
            where = simulate_exits(scores, list(thresholds))
            mean = torch.tensor(path, dtype=torch.float64)[where].mean() if where.numel() else None
            return thresholds, float(path[-1]) if mean is None else float(mean)

        thresholds, cost = cost_of(enabled)
        base = float(self.eem.base_macs)
        while True:
            best: tuple[float, int, tuple[float, ...]] | None = None
            for e in range(num_exits):
                if not enabled[e] or thresholds[e] == math.inf:
                    continue
                trial = enabled.copy()
                trial[e] = False
                thresholds_e, cost_e = cost_of(trial)
                gain = (cost_e - cost) / base  # net saving this exit brings (negative: it costs)
                # An exit that brings nothing (gain 0: e.g. nobody leaves there) goes too: its
                # gate would still cost wall-clock on every sample reaching it.
                if gain <= self.config.min_exit_gain and (best is None or cost_e < best[0]):
                    best = (cost_e, e, thresholds_e)
            if best is None:
                return enabled, switched
            cost_e, e, thresholds_e = best
            switched[e] = (
                "switched off: it saves nothing on held-out evidence (no sample would leave "
                "there), and its gate would still run on every sample reaching it"
                if cost - cost_e < 0.5
                else f"switched off: without it the path costs {cost - cost_e:.0f} "
                f"{unit}/sample less on held-out evidence; it saves {(cost_e - cost) / base:+.4f} "
                f"of the base model net (its head costs {head_costs[e]:.0f} {unit} on every "
                "sample reaching it)"
            )
            enabled[e] = False
            thresholds, cost = thresholds_e, cost_e

    def selection_head_costs(self, gate: Gate) -> tuple[float, ...]:
        """Per exit, what exit selection charges for its head (and gate) on every sample that
        reaches it: its MACs (``head_cost="macs"``), or its share of the base model's batch-1
        time in MAC units (``head_cost="time"``: share x base MACs), from
        ``config.head_time_fractions`` or measured once, here, and kept.

        Example:
            >>> calibrator.selection_head_costs(eem.gate)  # doctest: +SKIP
            (1320.0, 2210.0, 3050.0, 4100.0)
        """
        eem = self.eem
        if self.config.head_cost == "macs":
            return tuple(float(m) for m in eem.head_macs)
        if self.head_time_fractions is None:
            self.head_time_fractions = measure_head_time_fractions(eem, gate)
        shares = self.head_time_fractions
        if len(shares) != eem.num_exits:
            raise ConfigError(
                f"head_time_fractions has {len(shares)} values, expected {eem.num_exits} (one per "
                "exit)"
            )
        return tuple(share * float(eem.base_macs) for share in shares)

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Nothing to save: the logits it remembers are recomputed when needed."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Nothing to restore (see :meth:`state_dict`); forgets the logits it remembers."""
        self._scored = None
