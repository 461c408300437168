"""DistillConfig: every knob of online self-distillation, validated and JSON-serialisable."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..errors import ConfigError

#: How thresholds are tested: fixed-sequence Learn-then-Test, or Clopper-Pearson per exit.
CalibrationMethod = Literal["ltt", "clopper_pearson"]
#: ``"joint"``: one threshold, agreement pooled over every early answer; ``"per_exit"``: each exit.
CalibrationMode = Literal["joint", "per_exit"]
#: What the calibration promises: Learn-then-Test with high probability, or CRC in expectation.
Guarantee = Literal["high_probability", "expected"]
#: Which samples that ran to the end teach once a gate is open (see ``replay_after_open``).
ReplayAfterOpen = Literal["sampled", "all"]
#: The guarantee a config without the field (every learner saved before it existed) has.
DEFAULT_GUARANTEE: Guarantee = "high_probability"
#: ``"learned"``: fit a gate while learning; ``"fixed"``: keep the gate given to ``ee.wrap``.
GateChoice = Literal["learned", "fixed"]
#: How exit selection prices a head: in MACs, or in measured wall-clock time (see DistillConfig).
HeadCost = Literal["macs", "time"]
#: dtype of the features stored in the replay and evidence buffers.
StorageDtype = Literal["float32", "float16", "bfloat16"]

_STORAGE_DTYPES: tuple[str, ...] = get_args(StorageDtype)
_METHODS: tuple[str, ...] = get_args(CalibrationMethod)
_MODES: tuple[str, ...] = get_args(CalibrationMode)
_GATES: tuple[str, ...] = get_args(GateChoice)
_GUARANTEES: tuple[str, ...] = get_args(Guarantee)
_REPLAY_AFTER_OPEN: tuple[str, ...] = get_args(ReplayAfterOpen)
_HEAD_COSTS: tuple[str, ...] = get_args(HeadCost)
#: Largest float32: the learner trains in float32.
_FLOAT32_MAX = 3.4028234663852886e38
#: Older spellings still accepted (saved configs, scripts): ``"wrap"`` read like the function.
_GATE_ALIASES = {"wrap": "fixed"}


@dataclass
class DistillConfig:
    """How an :class:`~earlyexit.distill.OnlineDistiller` learns and when its gates open.

    Guarantee (what is promised depends on ``guarantee`` and ``calibration_mode``):
        guarantee: ``"high_probability"`` (default): Learn-then-Test, the promise below on
            agreement among early answers, holding with probability ``confidence`` over the draw
            of the evidence; proving 0.99 at 95% needs ~300-470 evidence samples before any gate
            may open. ``"expected"``: conformal risk control
            (:func:`earlyexit.calibration.calibrate_risk_control`): the *expected* disagreement of
            a served answer with the full model, over the draw of the evidence and of the new
            sample, is at most ``1 - target_agreement``. Samples that run to the end count as
            agreeing, so this bounds disagreement among *all* served answers on average, not among
            early answers, and not for every calibration (only the average over calibrations);
            ``confidence`` plays no part in it. It needs far less evidence (99 samples at 0.99).
            Joint mode only (``calibration_mode="per_exit"`` is refused). Both assume the evidence
            is exchangeable with the traffic served next: evidence rows are held-out contents
            drawn by audit coins that ignore what the heads say (every sample while gates are
            closed, a uniform ``audit_share`` of held-out traffic once they open, exits and
            non-exits alike), so they are a uniform sample of held-out traffic at each moment and
            no reweighting is needed; traffic that drifts breaks exchangeability (the drift
            monitor is the protection). Under ``"expected"`` the drift monitor tests the served
            disagreement rate (see ``drift_alpha``). To make CRC the default, change
            ``DEFAULT_GUARANTEE``.
        target_agreement: required agreement with the full model (argmax equal) among the samples
            that leave early, e.g. 0.99. In the default ``"joint"`` mode it is the agreement pooled
            over all early answers (one exit may be below it if another is above); in
            ``"per_exit"`` mode it holds at each exit separately.
        confidence: probability that the guarantee holds: for the pooled agreement in ``"joint"``
            mode (one Learn-then-Test sequence), for every exit at once in ``"per_exit"`` mode
            (the level split over exits, Bonferroni).
        calibration_method: ``"ltt"`` (fixed-sequence tests) or ``"clopper_pearson"``
            (per-exit mode only).
        calibration_mode: ``"joint"`` (default): one threshold for every exit, agreement pooled
            over all early answers is guaranteed (evidence of every exit counts towards one test,
            so gates open with far less traffic; the drift monitor pools too); ``"per_exit"``:
            every exit on its own, each guaranteed (level split over exits; needs more evidence).

    Evidence:
        audit_rate: share of early-exiting samples that still run to the end, so agreement is
            measured on the traffic that actually exits (while every gate is closed, every sample
            runs to the end and counts as evidence). Audits are drawn among held-out contents only
            (see ``calibration_fraction``), so every audited sample becomes evidence.
        audit_boost: share of traffic audited while the held-out evidence is short of
            ``evidence_target`` (tapering linearly to ``audit_rate`` as it fills): right after gates
            open the evidence is thin and every sample of it loosens the provable thresholds, so
            audits pay for themselves then. ``0`` (or ``<= audit_rate``) audits at ``audit_rate``.
        evidence_target: held-out evidence samples the boost aims for (``0``: no boost).
        calibration_fraction: share of sample *contents* held out for calibration: a seeded hash of
            each image decides once and for all whether it may teach or may calibrate, so repeated
            requests and later epochs never leak training data into the evidence.
        evidence_samples: most recent held-out samples kept for calibration (a recency window).

    Gate:
        gate: ``"learned"`` (default): the learner fits a :class:`~earlyexit.gates.LearnedGate` at
            every calibration (a per-exit logistic model of "this head agrees with the full model"
            from its confidence and the previous head's, fitted on training-side traffic the heads
            had not yet learned from) and serves it with the heads; its scores are log-odds of
            agreement, on one scale at every exit, which is what the shared threshold of joint
            calibration assumes. ``"fixed"``: keep the gate given to :func:`earlyexit.wrap`
            (``"wrap"``, the older spelling, is accepted and read as ``"fixed"``).
        gate_samples: most recent training-side samples the learned gate is fitted on.

    Learning:
        lr, weight_decay: AdamW on the heads' trainable part (the backbone is never trained).
        lr_half_life: samples after which the learning rate halves (``0`` keeps it constant); a
            slow decay settles the heads without stopping them from following drift.
        temperature: distillation temperature (KL between softened student and teacher).
        hard_label_weight: weight of cross-entropy on the teacher's argmax, mixed with the KL.
        batch_size: replay minibatch size.
        replay_ratio: steady-state replay ratio: replay samples drawn for training per training
            sample stored (each stored row owes ``replay_ratio / batch_size`` optimizer steps), the
            floor the learning schedule tapers to once the heads stop improving; small, but
            enough to follow slow drift.
        warmup_replay_ratio: the replay ratio while the heads still improve: from the start and
            again after a drift alarm. Traffic that runs to the end saves nothing whatever the
            learner does, and only learning makes savings possible, so the learner learns hard
            first. The ratio halves after each *plateau window* (below) down to
            ``replay_ratio``; a value below ``replay_ratio`` is read as ``replay_ratio`` (a flat
            schedule).
        plateau_window: training rows per progress window. Before rows join replay the student
            sees them (it has never trained on them): their mean distillation loss over a window
            is the *fresh loss*, a cheap, deterministic measure of how well the heads generalise.
        plateau_tolerance: a window whose fresh loss is not at least this share below the best
            window so far is a plateau (halves the replay ratio in force); ``0`` tapers only when
            the loss does not fall at all.
        train_time_budget: ``None`` (default): learning is scheduled in samples and steps only
            (above), never in wall-clock, so the same seed and stream give bit-identical heads,
            thresholds and figures on an idle or a busy machine (synchronous mode). A number
            opts in to a wall-clock cap on top of the schedule: all learning work (per-batch
            bookkeeping, training steps, calibrations), timed in the CPU time of the thread
            doing it (waiting for a core or for the interpreter lock is not work), may take at
            most this share of the wall-clock spent serving; runs then depend on the machine's
            speed. Precisely: every
            served batch earns its serving time times the budget (in background mode, more for
            the samples the full model answered, see ``closed_time_budget``), and an owed
            training step starts only while the learning time spent so far plus one step stays
            within the time earned so far. Bookkeeping always runs and is counted. In
            background mode a scheduled calibration also waits until the time spent is within
            the time earned; in synchronous mode calibrations run on schedule.
        closed_time_budget: with a ``train_time_budget`` in background mode only: the budget
            earned by the samples the full model answered (every sample while every gate is
            closed: warm-up, after a drift alarm). A batch earns its serving time times
            ``train_time_budget + (closed_time_budget - train_time_budget) * share answered by
            the full model`` (``train_time_budget`` if it is the higher); time earned and not
            spent carries over, time overspent is paid back first. A synchronous step's
            learning delays its own answers, so it earns only ``train_time_budget``. Ignored
            when ``train_time_budget`` is ``None``.
        learn_macs_budget: cap on learning work counted in MACs (machine-independent, so runs
            stay reproducible): head training (forward and backward, ``3x`` the heads' forward
            MACs per row trained) and calibration may take at most this share of the MACs served
            (audits included) by samples that left early, ``closed_macs_budget`` of those served
            by samples the full model answered. Precisely: every served batch earns its MACs
            times ``learn_macs_budget + (closed_macs_budget - learn_macs_budget) * share answered
            by the full model``, and an owed training step starts only while the learning MACs
            so far plus one step stay within the MACs earned so far (steps not yet affordable
            stay owed; calibrations run on schedule and are paid from the same account). Over a
            whole stream learning therefore costs at most ``closed_macs_budget`` of serving, and
            at most ``learn_macs_budget`` once most traffic leaves early. ``None``: no cap (the
            replay-ratio schedule alone decides).
        closed_macs_budget: the share earned by samples the full model answered (every sample
            while every gate is closed): they save nothing whatever the learner does, so this
            is where learning is cheapest to afford. Ignored when ``learn_macs_budget`` is
            ``None``; read as ``learn_macs_budget`` if lower.
        replay_after_open: which samples that ran to the end teach once a gate is open.
            ``"sampled"`` (default): only those drawn by teaching coins (``teach_rate``) that
            ignore what the heads say, so the replay and the learned gate's data stay a uniform
            sample of the training-side traffic. ``"all"``: every one of them; with gates open
            these are the samples no head could answer, so replay fills with the hardest ones and
            the heads, trained on them, lose the easy ones they let out (measured: more training
            after gates open then lowered the saving). While every gate is closed both are the
            same: everything runs to the end and teaches.
        teach_rate: with ``replay_after_open="sampled"``, the share of training-side samples that
            run to the end once a gate is open even if a head answers them (they cost what
            audits cost: the MACs they would have saved).
        replay_samples: cap on the replay buffer (features at every exit + teacher logits).
        max_memory_bytes: cap on replay + evidence buffers together (``None``: sample caps only).
            Calibrations work on one copy of the evidence buffer, allocated once and reused.
        storage_dtype: dtype of stored features (``"float16"`` halves the memory).

    Schedule:
        warmup_samples: samples served before the first calibration.
        recalibrate_every: samples served between recalibrations (heads and thresholds are
            published together, so a head is never served with thresholds fitted to another).

    Exit selection and drift:
        auto_switch_off: switch off exits that cost more MACs (their head on every sample reaching
            them; or time, see ``head_cost``) than they save (a switched-off exit's head no longer
            runs: a learned gate's look-back skips it); re-decided at every calibration, on
            every 4th evidence row, so the thresholds are tested once, on rows that did not
            choose the exits.
        min_exit_gain: share of the base model's MACs an exit must save (net) to stay on; at 0 an
            exit is switched off when it saves nothing net (its gate still costs wall-clock).
        dormant_after: calibrations in a row an exit may be switched off before its head stops
            training (an exit that never fires must not keep costing: a dormant head costs no
            learning MACs, keeps its weights and is still scored at every calibration, so it
            wakes as soon as it pays again; a drift or mix alarm wakes every head). ``0``: heads
            never go dormant.
        head_cost: how exit selection prices each head (and its gate) on every sample reaching
            it. ``"macs"`` (default): its MACs, a deterministic number, so a seed gives the same
            run on any machine. ``"time"``: its measured time at batch 1 as a share of the base
            model's batch-1 time, in MAC units (share x base MACs; the backbone is priced by its
            MACs, which track its time): on small, dispatch-bound backbones a head costs ~1% of
            the MACs but 3-5% of the time, and pricing it so switches off exits whose time saving
            does not pay for their heads. Selection only: thresholds, the guarantee and the
            reported MAC saving are unchanged.
        head_time_fractions: with ``head_cost="time"``, one share per exit (of the base model's
            batch-1 time) to price heads with; ``None`` (default) measures them once, at the
            first exit selection (:func:`~earlyexit.head_timing.measure_head_time_fractions`),
            and the learner reports them in ``stats()["head_time_fractions"]``: give them back
            here to make a run reproducible.
        drift_window: audited exits per exit the drift monitor looks back on.
        drift_alpha: level of the monitor's one-sided binomial test "agreement < target" among
            audited early answers (pooled in joint mode). Under ``guarantee="expected"`` it tests
            "served disagreement > 1 - target" instead: disagreement among audited early answers
            against ``(1 - target) / exit share`` (the share of recent traffic leaving early,
            measured on every served sample), i.e. the rate of wrong early answers among all
            answers.
        forget_on_drift: on a drift alarm also drop the replay buffer (heads then learn only from
            traffic after the shift).

    Runtime:
        background: train on a background thread while :meth:`step` serves. The schedule still
            decides how many steps each stored row owes (a worker more than ``MAX_OWED_STEPS``
            behind drops the excess), but when the steps run next to serving, and so which
            student each calibration copies and each fresh-loss window measures, depends on
            thread timing: background runs are not reproducible step for step.
        seed: seeds audit coins, evidence hashing and replay sampling (reproducible runs).

    Example:
        >>> cfg = DistillConfig(target_agreement=0.99, audit_rate=0.05)
        >>> DistillConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    target_agreement: float = 0.99
    confidence: float = 0.95
    calibration_method: CalibrationMethod = "ltt"
    calibration_mode: CalibrationMode = "joint"
    guarantee: Guarantee = DEFAULT_GUARANTEE
    gate: GateChoice = "learned"
    gate_samples: int = 8192
    audit_rate: float = 0.05
    audit_boost: float = 0.25
    evidence_target: int = 2000
    calibration_fraction: float = 0.4
    evidence_samples: int = 12000
    lr: float = 5e-3
    weight_decay: float = 1e-4
    lr_half_life: int = 0
    temperature: float = 2.0
    hard_label_weight: float = 0.0
    batch_size: int = 64
    replay_ratio: float = 8.0
    warmup_replay_ratio: float = 128.0
    plateau_window: int = 256
    plateau_tolerance: float = 0.02
    train_time_budget: float | None = None
    closed_time_budget: float = 1.0
    learn_macs_budget: float | None = 0.05
    closed_macs_budget: float = 0.25
    replay_after_open: ReplayAfterOpen = "sampled"
    teach_rate: float = 0.05
    replay_samples: int = 20000
    max_memory_bytes: int | None = 256 * 2**20
    storage_dtype: StorageDtype = "float32"
    warmup_samples: int = 512
    recalibrate_every: int = 512
    auto_switch_off: bool = True
    min_exit_gain: float = 0.0
    dormant_after: int = 3
    head_cost: HeadCost = "macs"
    head_time_fractions: tuple[float, ...] | None = None
    drift_window: int = 400
    drift_alpha: float = 1e-3
    forget_on_drift: bool = True
    background: bool = False
    seed: int = 0

    @property
    def teaching_rate(self) -> float:
        """Share of training-side traffic drawn to run to the end and teach once a gate is open
        (``teach_rate`` under ``replay_after_open="sampled"``, else 0: all such samples teach)."""
        return self.teach_rate if self.replay_after_open == "sampled" else 0.0

    def __post_init__(self) -> None:
        def unit_open(name: str) -> None:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 < value < 1.0):
                raise ConfigError(f"{name} must be in (0, 1), got {value!r}")

        def unit_closed(name: str) -> None:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ConfigError(f"{name} must be in [0, 1], got {value!r}")

        def positive_int(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            low = 0 if allow_zero else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")

        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            # Training runs in float32: a value beyond its range overflows at the first step.
            ok = (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value <= _FLOAT32_MAX
            )
            if not ok or value < 0 or (value == 0 and not allow_zero):
                raise ConfigError(
                    f"{name} must be a finite number > 0 (at most {_FLOAT32_MAX:.3g}, float32's "
                    f"largest), got {value!r}"
                )

        for name in ("target_agreement", "confidence", "calibration_fraction", "drift_alpha"):
            unit_open(name)
        for name in (
            "audit_rate",
            "audit_boost",
            "teach_rate",
            "hard_label_weight",
            "min_exit_gain",
            "plateau_tolerance",
        ):
            unit_closed(name)
        for name in (
            "evidence_samples",
            "batch_size",
            "replay_samples",
            "drift_window",
            "gate_samples",
            "plateau_window",
        ):
            positive_int(name)
        for name in (
            "warmup_samples",
            "recalibrate_every",
            "lr_half_life",
            "seed",
            "evidence_target",
            "dormant_after",
        ):
            positive_int(name, allow_zero=name != "recalibrate_every")
        for name in (
            "lr",
            "temperature",
            "replay_ratio",
            "warmup_replay_ratio",
            "closed_time_budget",
            "closed_macs_budget",
        ):
            positive(name)
        positive("weight_decay", allow_zero=True)
        if self.calibration_method not in _METHODS:
            raise ConfigError(
                f"calibration_method must be one of {_METHODS}, got {self.calibration_method!r}"
            )
        if self.calibration_mode not in _MODES:
            raise ConfigError(
                f"calibration_mode must be 'joint' or 'per_exit', got {self.calibration_mode!r}"
            )
        if self.replay_after_open not in _REPLAY_AFTER_OPEN:
            raise ConfigError(
                "replay_after_open must be 'sampled' (teaching coins) or 'all' (every sample that "
                f"ran to the end), got {self.replay_after_open!r}"
            )
        if self.guarantee not in _GUARANTEES:
            raise ConfigError(
                f"guarantee must be 'high_probability' (Learn-then-Test) or 'expected' (conformal "
                f"risk control), got {self.guarantee!r}"
            )
        if self.guarantee == "expected" and self.calibration_mode != "joint":
            raise ConfigError(
                "guarantee='expected' (conformal risk control) calibrates one threshold shared by "
                "the exits and bounds disagreement over all served answers: it needs "
                f"calibration_mode='joint', got {self.calibration_mode!r}"
            )
        if isinstance(self.gate, str) and self.gate in _GATE_ALIASES:
            self.gate = _GATE_ALIASES[self.gate]  # type: ignore[assignment]
        if self.gate not in _GATES:
            raise ConfigError(
                f"gate must be 'learned' (fit a gate while learning) or 'fixed' (keep the gate "
                f"given to ee.wrap), got {self.gate!r}"
            )
        if self.storage_dtype not in _STORAGE_DTYPES:
            raise ConfigError(
                f"storage_dtype must be one of {_STORAGE_DTYPES}, got {self.storage_dtype!r}"
            )
        if self.max_memory_bytes is not None:
            positive_int("max_memory_bytes")
        if self.learn_macs_budget is not None:
            positive("learn_macs_budget")
        if self.train_time_budget is not None:
            positive("train_time_budget")
        for name in ("auto_switch_off", "forget_on_drift", "background"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._check_head_cost()

    def _check_head_cost(self) -> None:
        if self.head_cost not in _HEAD_COSTS:
            raise ConfigError(f"head_cost must be 'macs' or 'time', got {self.head_cost!r}")
        shares = self.head_time_fractions
        if shares is None:
            return
        if self.head_cost != "time":
            raise ConfigError(
                "head_time_fractions is used only with head_cost='time'; set head_cost='time' "
                "or drop head_time_fractions"
            )
        if isinstance(shares, (str, bytes)) or not isinstance(shares, (list, tuple)) or not shares:
            raise ConfigError(
                "head_time_fractions must be a non-empty list of numbers (one per exit: its head's "
                f"batch-1 time as a share of the base model's), got {shares!r}"
            )
        for i, value in enumerate(shares):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and 0.0 <= value <= _FLOAT32_MAX)
            ):
                raise ConfigError(
                    f"head_time_fractions[{i}] must be a finite number >= 0, got {value!r}"
                )
        self.head_time_fractions = tuple(float(v) for v in shares)  # JSON gives a list back

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (saved with the learner's state)."""
        data = dataclasses.asdict(self)
        if self.head_time_fractions is not None:
            data["head_time_fractions"] = list(self.head_time_fractions)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        """Rebuild from :meth:`to_dict`; unknown keys are an error (a typo must not be ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown DistillConfig fields: {', '.join(unknown)}")
        return cls(**data)
