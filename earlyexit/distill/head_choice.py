"""Choosing exit places and head kinds per model, on the first live traffic.

Which head kind pays depends on the model and the traffic: under the learning MAC budget, conv
heads win on Fashion-MNIST (they see where things are) and linear heads on the digits (a conv head
costs ~10x more to train, so it gets ~10x fewer steps). :class:`HeadChooser` measures it instead
of guessing. While it runs, the traffic is answered by the full model (as it is anyway before any
gate opens); every candidate head kind at every candidate place learns from the same traffic by
self-distillation, each within the same share of the learning MAC budget. Contents are split as
the learner splits them (same seed, same ``calibration_fraction``): held-out ones are never
trained on. Half of the held-out rows price the choice: each assignment of ``{off, kind...}`` to
the places costs the MACs a sample pays when the enabled heads run on the way and the confident
ones leave at the most lenient shared threshold whose agreement among early answers meets the
target (a point estimate: the guarantee comes later, from the learner's own calibration). The
cheapest assignment is kept; places it switches off get no head at all (nothing to run, nothing
to train). :meth:`HeadChooser.wrap` builds the model with the chosen heads, already trained, and
:meth:`HeadChooser.handover` gives the other half of the held-out rows, which the choice never
looked at, to the learner as its first evidence, with the rows the heads trained on and their
optimizer state (:meth:`OnlineDistiller.take_over`), so the learner carries on where the choice
stopped.

Example:
    >>> chooser = HeadChooser(model, kinds=("linear", "conv"), samples=2048)  # doctest: +SKIP
    >>> for x in stream:  # doctest: +SKIP
    ...     logits = chooser.step(x)  # the full model's answers
    ...     if chooser.done:
    ...         break
    >>> learner = OnlineDistiller(chooser.wrap(), config)  # doctest: +SKIP
    >>> learner.take_over(chooser.handover())  # doctest: +SKIP
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..calibration import empirical_joint_thresholds
from ..errors import ConfigError, InputError
from ..gates import Gate, LearnedGate, make_gate
from ..heads import ExitHead, HeadSpec, build_head, head_kinds
from ..model import EarlyExitModel
from ..routing import exit_path_macs, gates_open, heads_evaluated, simulate_exits
from ..wrapping import DEFAULT_HEAD_BUDGET, DEFAULT_NUM_EXITS, wrap
from .buffers import ring_layout
from .calibrator import score_logits
from .config import DistillConfig
from .evidence import ContentSplit
from .handover import Handover
from .learner import TRAIN_MACS_FACTOR
from .trainer import HeadTrainer, classify_all

#: Held-out rows are priced on every CHOOSE_EVERY-th one; the others are handed to the learner
#: as evidence (:meth:`HeadChooser.handover`): rows the choice never looked at test it fairly.
CHOOSE_EVERY = 2
#: Fewest rows a choice is priced on: below it every place keeps the cheapest kind.
MIN_HELD_OUT = 64


class _CandidateHeads(ExitHead):
    """Every candidate kind's head at one place: ``reduce`` pools the feature once per kind and
    returns the pooled tensors flattened side by side; ``classify`` answers uniform logits at no
    cost (the chooser's gates stay closed: nothing leaves, nothing is worth computing)."""

    kind = "candidates"

    def __init__(self, heads: dict[str, ExitHead], num_classes: int) -> None:
        first = next(iter(heads.values()))
        super().__init__(first.layout)
        self.candidates = nn.ModuleDict(heads)
        self.num_classes = num_classes
        self.shapes: dict[str, tuple[int, ...]] = {}

    def reduce(self, feature: Tensor) -> Tensor:
        parts = []
        for kind, head in self.candidates.items():
            z = head.reduce(feature)
            self.shapes[kind] = tuple(z.shape[1:])
            parts.append(z.flatten(1))
        return torch.cat(parts, dim=1)

    def split(self, z: Tensor) -> dict[str, Tensor]:
        """Undo :meth:`reduce`'s concatenation: each kind's pooled input, in its own shape."""
        out, start = {}, 0
        for kind, shape in self.shapes.items():
            width = math.prod(shape)
            out[kind] = z[:, start : start + width].reshape(z.shape[0], *shape)
            start += width
        return out

    def classify(self, z: Tensor) -> Tensor:
        return z.new_zeros((z.shape[0], self.num_classes))


@dataclass
class HeadChoice:
    """What :class:`HeadChooser` chose and why.

    Attributes:
        places: the candidate places (module names), in execution order.
        kinds: per candidate place, the head kind kept there, or ``None`` (switched off).
        expected_mac_saving: the chosen assignment's saving on held-out rows (point estimate at
            the target, heads' own MACs included).
        candidates: per place, per kind: the head's MACs, its held-out agreement with the full
            model, and the saving of that head alone at that place (``net_saving``).
        samples: traffic samples the chooser served; ``held_out``: rows it priced on.
        served_macs / learning_macs: MACs of serving (the full model) and of training every
            candidate during the choice.
        reason: one sentence on how the choice was made.
    """

    places: tuple[str, ...]
    kinds: tuple[str | None, ...]
    expected_mac_saving: float
    candidates: list[dict[str, dict[str, float]]]
    samples: int
    held_out: int
    served_macs: int
    learning_macs: int
    reason: str
    steps: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> list[tuple[str, str]]:
        """``(place, kind)`` of every place that keeps a head."""
        return [(p, k) for p, k in zip(self.places, self.kinds, strict=True) if k is not None]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly record (benchmarks and stats)."""
        return {
            "places": list(self.places),
            "kinds": list(self.kinds),
            "expected_mac_saving": self.expected_mac_saving,
            "candidates": self.candidates,
            "samples": self.samples,
            "held_out": self.held_out,
            "served_macs": self.served_macs,
            "learning_macs": self.learning_macs,
            "learning_macs_ratio": self.learning_macs / self.served_macs
            if self.served_macs
            else None,
            "steps": dict(self.steps),
            "reason": self.reason,
        }


class HeadChooser:
    """Serve the first ``samples`` of traffic with the full model while candidate heads learn;
    then choose the places and head kinds that pay (see the module notes).

    Args:
        model: the classifier (never changed; its hooks are removed with the wrappers).
        kinds: candidate head kinds (registered names, at least one).
        exits, num_exits, input_size, head_budget, gate, supervisor: as for
            :func:`earlyexit.wrap`; ``exits`` are the candidate places.
        samples: how much traffic the choice watches (half the held-out contents price it).
        config: the learning settings the heads will be trained under later: ``target_agreement``
            (the target of the pricing), ``closed_macs_budget`` (the learning MACs each kind may
            spend, as a share of the MACs the choice serves: what a learner of that kind alone
            would spend, so the choice costs up to ``len(kinds)`` times that),
            ``warmup_replay_ratio``, ``batch_size``, ``lr``, and the content split (``seed``,
            ``calibration_fraction``).

    Raises:
        ConfigError: no kind, an unknown or repeated kind, ``samples`` below 8.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        kinds: Sequence[str] = ("linear", "conv"),
        exits: str | Sequence[str | int] = "auto",
        num_exits: int = DEFAULT_NUM_EXITS,
        samples: int = 2048,
        config: DistillConfig | None = None,
        input_size: tuple[int, int, int] | None = None,
        head_budget: float = DEFAULT_HEAD_BUDGET,
        gate: str | Gate = "max_softmax",
        supervisor: Any = None,
    ) -> None:
        kinds = tuple(kinds) if not isinstance(kinds, str) else (kinds,)
        if not kinds:
            raise ConfigError("kinds must name at least one head kind, e.g. ('linear', 'conv')")
        known = head_kinds()
        for kind in kinds:
            if not isinstance(kind, str) or kind not in known:
                raise ConfigError(
                    f"unknown head kind {kind!r} among kinds; known kinds: {', '.join(known)}"
                )
        if len(set(kinds)) != len(kinds):
            raise ConfigError(f"kinds must not repeat a kind, got {list(kinds)}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 8:
            raise ConfigError(f"samples must be an int >= 8, got {samples!r}")
        self.config = config if config is not None else DistillConfig()
        self.kinds = kinds
        self.samples = samples
        self._model = model
        self._wrap_args = {
            "input_size": input_size,
            "head_budget": head_budget,
            "gate": gate,
            "supervisor": supervisor,
        }
        num_classes: list[int] = []

        def factory(spec: HeadSpec) -> ExitHead:
            num_classes.append(spec.num_classes)
            return _CandidateHeads({k: build_head(k, spec) for k in kinds}, spec.num_classes)

        # One wrapper serves the choice (one backbone pass pools for every kind); each kind's
        # own wrapper gives its heads' MACs (built once, then dropped with its hooks).
        self.probe = wrap(
            model,
            exits=exits,
            head=factory,
            num_exits=num_exits,
            input_size=input_size,
            head_budget=head_budget,
            gate="max_softmax",
        )
        self.places = tuple(e.name for e in self.probe.exits)
        self.head_macs: dict[str, tuple[int, ...]] = {}
        for kind in kinds:
            sized = wrap(
                model,
                exits=list(self.places),
                head=kind,
                input_size=input_size,
                head_budget=head_budget,
                validate=False,
            )
            self.head_macs[kind] = sized.head_macs
            del sized
        self.num_classes = num_classes[0]
        served_gate = make_gate(gate) if isinstance(gate, str) else gate
        # A gate that must be fitted first is priced as max softmax (the learner fits it later).
        self._score_gate = (
            make_gate("max_softmax") if isinstance(served_gate, LearnedGate) else served_gate
        )
        # The learner's own split (same seed and share): what is held out here stays held out.
        self._split = ContentSplit(self.config.seed, self.config.calibration_fraction)
        lock, train_lock = threading.RLock(), threading.RLock()
        self.trainers = {
            kind: HeadTrainer(
                nn.ModuleList(h.candidates[kind] for h in self.probe.heads),
                self.config,
                lock,
                train_lock,
            )
            for kind in kinds
        }
        self._held_out: dict[str, list[list[Tensor]]] = {k: [] for k in kinds}
        self._held_out_labels: list[Tensor] = []
        self._learning_macs = dict.fromkeys(kinds, 0)
        self._served_macs = 0
        self.seen = 0
        self.choice: HeadChoice | None = None
        self._priced: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None

    @property
    def done(self) -> bool:
        """Whether the choice is made (after ``samples`` samples)."""
        return self.choice is not None

    # ------------------------------------------------------------------ serving and learning
    def step(self, x: Tensor) -> Tensor:
        """Serve ``x`` with the full model (its logits are returned) and learn from it; once
        ``samples`` samples have been seen, choose (:attr:`choice`). Calls after the choice
        only serve."""
        if self.choice is not None:
            with torch.no_grad():
                return self._model(x)
        self.probe.check_input(x)
        with torch.no_grad():
            _, trace = self.probe.trace(x, input_checked=True)
        teacher = trace.final_logits
        if teacher is None:
            raise InputError("the full model answered no row of this batch")
        teacher = teacher.detach()
        batch = teacher.shape[0]
        per_kind = {k: [] for k in self.kinds}
        for head, record in zip(self.probe.heads, trace.exits, strict=True):
            assert record is not None  # every head runs on every row in a trace
            for kind, z in head.split(record.z.detach()).items():
                per_kind[kind].append(z.float())
        finite = torch.isfinite(teacher).all(dim=1)
        for zs in per_kind.values():
            for z in zs:
                finite &= torch.isfinite(z.flatten(1)).all(dim=1)
        side = self._split.is_calibration(x).to(finite.device)
        held, train = side & finite, ~side & finite
        self._served_macs += batch * int(self.probe.base_macs)
        self.seen += batch
        if bool(held.any()):
            self._held_out_labels.append(teacher[held].argmax(dim=-1))
            for kind, zs in per_kind.items():
                self._held_out[kind].append([z[held] for z in zs])
        if bool(train.any()):
            self._learn(per_kind, teacher, train)
        if self.seen >= self.samples:
            self.choice = self._choose()
        return teacher

    def _learn(self, per_kind: dict[str, list[Tensor]], teacher: Tensor, train: Tensor) -> None:
        """Store the training rows for every kind and take the steps each kind can afford: each
        kind gets ``closed_macs_budget`` of the MACs served, what a learner of that kind alone
        would spend, so every kind is priced as mature as it would be there."""
        cfg = self.config
        allowance = cfg.closed_macs_budget * self._served_macs
        for kind, zs in per_kind.items():
            trainer = self.trainers[kind]
            rows = [z[train] for z in zs]
            if trainer.replay is None:
                fields, caps = ring_layout(cfg, rows, teacher.shape[1], False)
                trainer.build(fields, teacher.shape[1], caps["replay"], teacher.device)
            trainer.add(rows, teacher[train].float(), cfg.warmup_replay_ratio)
            per_row = TRAIN_MACS_FACTOR * sum(self.head_macs[kind])
            while trainer.credit >= 1.0:
                cost = per_row * min(cfg.batch_size, len(trainer.replay or ()))
                if self._learning_macs[kind] + cost > allowance:
                    break
                trainer.claim_step()
                self._learning_macs[kind] += per_row * trainer.train_step()

    def finish(self) -> HeadChoice:
        """The choice: the one made after ``samples`` samples, or one made now on what was seen
        (traffic that ended early)."""
        if self.choice is None:
            self.choice = self._choose()
        return self.choice

    # ------------------------------------------------------------------ the choice
    def _choose(self) -> HeadChoice:
        """Price every assignment of {off, kind} to the places on the priced held-out rows; keep the
        cheapest (coordinate descent from each all-one-kind assignment)."""
        places = self.places
        base = float(self.probe.base_macs)
        steps = {k: self.trainers[k].train_steps for k in self.kinds}
        learning = sum(self._learning_macs.values())
        labels = torch.cat(self._held_out_labels) if self._held_out_labels else None
        if labels is not None:
            labels = labels[self._priced_rows(labels.shape[0])]
        held = 0 if labels is None else int(labels.shape[0])
        cheapest = min(self.kinds, key=lambda k: sum(self.head_macs[k]))
        if labels is None or held < MIN_HELD_OUT:
            return HeadChoice(
                places,
                (cheapest,) * len(places),
                0.0,
                [],
                self.seen,
                held,
                self._served_macs,
                learning,
                f"{held} held-out rows (< {MIN_HELD_OUT}): every place keeps the cheapest kind, "
                f"{cheapest}",
                steps,
            )
        self._priced = self._held_out_scores(labels)
        cost = self._cost

        options: list[str | None] = [None, *self.kinds]
        best: tuple[float, tuple[str | None, ...]] | None = None
        for start in self.kinds:
            current = [start] * len(places)
            current_cost = cost(current)
            improved = True
            while improved:
                improved = False
                for i in range(len(places)):
                    for option in options:
                        if option == current[i]:
                            continue
                        trial = current.copy()
                        trial[i] = option
                        trial_cost = cost(trial)
                        if trial_cost < current_cost - 1e-9:
                            current, current_cost, improved = trial, trial_cost, True
            if best is None or current_cost < best[0] - 1e-9:
                best = (current_cost, tuple(current))
        assert best is not None
        chosen_cost, chosen = best
        candidates = []
        for i in range(len(places)):
            per_kind = {}
            for kind in self.kinds:
                alone: list[str | None] = [None] * len(places)
                alone[i] = kind
                per_kind[kind] = {
                    "head_macs": float(self.head_macs[kind][i]),
                    "agreement": float(self._priced[1][kind][:, i].float().mean()),
                    "net_saving": 1.0 - cost(alone) / base,
                }
            candidates.append(per_kind)
        if all(k is None for k in chosen):
            # Nothing pays yet on so little learning: keep every place with the cheapest heads
            # (the learner keeps training them and switches off what still does not pay).
            return HeadChoice(
                places,
                (cheapest,) * len(places),
                0.0,
                candidates,
                self.seen,
                held,
                self._served_macs,
                learning,
                "no head pays yet at the target on held-out rows: every place keeps the cheapest "
                f"kind, {cheapest}",
                steps,
            )
        return HeadChoice(
            places,
            chosen,
            1.0 - chosen_cost / base,
            candidates,
            self.seen,
            held,
            self._served_macs,
            learning,
            f"cheapest of the assignments of {{off, {', '.join(self.kinds)}}} to {len(places)} "
            f"places on {held} held-out rows at agreement >= {self.config.target_agreement}",
            steps,
        )

    @staticmethod
    def _priced_rows(n: int) -> Tensor:
        """Positions (arrival order) of the held-out rows the choice is priced on."""
        return torch.arange(n) % CHOOSE_EVERY == 0

    def _held_out_features(self, kind: str) -> list[Tensor]:
        """Per place, ``kind``'s pooled input of every held-out row, in arrival order."""
        return [torch.cat([b[i] for b in self._held_out[kind]]) for i in range(len(self.places))]

    def handover(self) -> Handover:
        """What the learner that takes over needs, as the chosen heads see it (per kept place,
        its kind's rows and state): the held-out rows the choice was not priced on (evidence),
        the rows the heads trained on (replay), AdamW's state. Pass it to
        :meth:`OnlineDistiller.take_over`.

        Raises:
            ConfigError: the choice is not made yet.
        """
        if self.choice is None:
            raise ConfigError("no choice yet: call finish() or keep calling step()")
        kept = self.choice.kept
        if self._held_out_labels:
            labels = torch.cat(self._held_out_labels)
            rest = ~self._priced_rows(labels.shape[0])
            evidence_z = [
                self._held_out_features(kind)[self.places.index(place)][rest]
                for place, kind in kept
            ]
            labels = labels[rest]
        else:
            evidence_z, labels = [torch.zeros(0) for _ in kept], torch.zeros(0, dtype=torch.long)
        replay_z, teacher = self._replay_rows(kept)
        states = []
        for place, kind in kept:
            trainer = self.trainers[kind]
            position = {id(p): n for n, p in enumerate(trainer.student.parameters())}
            saved = trainer.optimizer.state
            head = trainer.student[self.places.index(place)]
            states.append(
                [
                    {k: v.detach().clone() for k, v in saved[p].items()}
                    if p in saved and id(p) in position
                    else {}
                    for p in head.parameters()
                ]
            )
        trained = max((self.trainers[k].trained_samples for _, k in kept), default=0)
        return Handover(evidence_z, labels, replay_z, teacher, states, trained)

    def _replay_rows(self, kept: list[tuple[str, str]]) -> tuple[list[Tensor], Tensor]:
        """Per kept place, its kind's stored training rows, and the teacher's logits: every
        kind stored the same rows in the same order (rings of one size, none wrapped)."""
        rings = {kind: self.trainers[kind].replay for _, kind in kept}
        sizes = {len(r) if r is not None else 0 for r in rings.values()}
        added = {r.added if r is not None else 0 for r in rings.values()}
        if len(sizes) != 1 or sizes != added or 0 in sizes:
            # Nothing stored yet, or a ring wrapped (a memory cap): the rows no longer align.
            return [torch.zeros(0) for _ in kept], torch.zeros(0, self.num_classes)
        views = {kind: ring.view() for kind, ring in rings.items() if ring is not None}
        zs = [views[kind][f"z{self.places.index(place)}"].clone() for place, kind in kept]
        return zs, next(iter(views.values()))["teacher"].clone()

    def _held_out_scores(self, labels: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per kind, the gate scores ``[N, P]`` and agreement ``[N, P]`` of its heads (as trained
        now) on the held-out rows the choice is priced on (``labels``: their full-model answers)."""
        scores, agrees = {}, {}
        for kind in self.kinds:
            zs = [z[self._priced_rows(z.shape[0])] for z in self._held_out_features(kind)]
            logits = classify_all(self.trainers[kind].student, zs)
            scores[kind], agrees[kind] = score_logits(self._score_gate, logits, labels)
        return scores, agrees

    def _cost(self, assignment: Sequence[str | None]) -> float:
        """Mean MACs per held-out sample when each place runs ``assignment``'s head (``None``:
        no head there) and samples leave at the most lenient shared threshold whose agreement
        among early answers meets the target on these rows."""
        assert self._priced is not None
        scores, agrees = self._priced
        held, num = next(iter(scores.values())).shape
        base = int(self.probe.base_macs)
        s = torch.zeros(held, num)
        a = torch.ones(held, num, dtype=torch.bool)
        head_costs = []
        for i, kind in enumerate(assignment):
            if kind is not None:
                s[:, i], a[:, i] = scores[kind][:, i], agrees[kind][:, i]
            head_costs.append(self.head_macs[kind][i] if kind is not None else 0)
        enabled = [k is not None for k in assignment]
        if not any(enabled):
            return float(base)
        thresholds = empirical_joint_thresholds(s, a, self.config.target_agreement, enabled=enabled)
        evaluated = heads_evaluated(gates_open(thresholds), False)
        path = exit_path_macs(self.probe.backbone_macs, head_costs, base, evaluated)
        where = simulate_exits(s, list(thresholds))
        return float(torch.tensor(path, dtype=torch.float64)[where].mean())

    def expected_saving(self, assignment: Sequence[str | None]) -> float:
        """MAC saving of ``assignment`` (one kind or ``None`` per candidate place) on the
        held-out rows, priced as the choice prices it (after the choice only).

        Example:
            >>> chooser.expected_saving(["linear", None, "conv", "conv"])  # doctest: +SKIP
            0.41
        """
        if self._priced is None:
            raise ConfigError(
                "nothing is priced yet: the choice has not been made on held-out rows"
            )
        if len(assignment) != len(self.places):
            raise ConfigError(
                f"expected one kind or None per candidate place ({len(self.places)}), got "
                f"{len(assignment)}"
            )
        for kind in assignment:
            if kind is not None and kind not in self.kinds:
                raise ConfigError(f"{kind!r} is not a candidate kind ({', '.join(self.kinds)})")
        return 1.0 - self._cost(assignment) / float(self.probe.base_macs)

    def wrap(self) -> EarlyExitModel:
        """The model wrapped with the chosen places and kinds, each head as trained during the
        choice (every gate closed).

        Raises:
            ConfigError: the choice is not made yet (keep calling :meth:`step`, or see
                :attr:`done`).
        """
        if self.choice is None:
            raise ConfigError(
                f"no choice yet: {self.seen} of {self.samples} samples seen; keep calling step()"
            )
        kept = self.choice.kept
        eem = wrap(
            self._model,
            exits=[place for place, _ in kept],
            head=[kind for _, kind in kept],
            validate=False,
            **self._wrap_args,
        )
        for j, (place, kind) in enumerate(kept):
            trained = self.trainers[kind].student[self.places.index(place)]
            with torch.no_grad():
                for target, source in zip(
                    eem.heads[j].state_dict().values(), trained.state_dict().values(), strict=True
                ):
                    target.copy_(source.to(dtype=target.dtype, device=target.device))
        return eem


__all__ = ["HeadChoice", "HeadChooser"]
