"""OnlineDistiller: exit heads learned from live traffic, gates opened only on audited evidence.

The learner only coordinates its parts, each in its own module: which traffic is evidence
(:mod:`.evidence`), the head trainer (:mod:`.trainer`) and the learned gate's data
(:mod:`.gate_data`), the policy calibrator (:mod:`.calibrator`), the drift monitor
(:mod:`.drift`), traffic counts (:mod:`.traffic`), the schedule (:mod:`.schedule`), the
background thread (:mod:`.worker`) and the undoing of a step that failed (:mod:`.undo`). Saving a learner saves the state of each part
(:mod:`.checkpoint`). This module is longer than the parts because it is the one place that
orders their work (what runs under which lock, in which order); it holds no policy of its own.

How it works (one call of :meth:`OnlineDistiller.step`):

1. The batch is checked (``eem.check_input``) and served by ``eem.trace``: confident samples
   leave early, the others run to the end, and every head is evaluated on every sample reaching
   it, so the pooled input ``z`` of every head is known for every sample that ran to the end, next
   to the full model's logits (the teacher). No second backbone pass is ever made for learning.
2. Which samples count as *evidence* is decided without regard to what the heads say: every
   held-out sample while all gates are closed (warm-up, after a drift alarm), otherwise a random
   audit of held-out samples (``audit_rate`` of traffic, more while evidence is short of
   ``evidence_target``), which run to the end even when a head answered them (so agreement is
   measured on the traffic that actually exits, not only on the hard remainder).
3. A seeded hash of each image's content decides, once and for all, whether that content may teach
   (replay buffer, trains the heads) or calibrate (evidence buffer, held out from training).
4. Heads are trained on a *shadow copy* (the student) from the replay buffer of stored ``z`` and
   teacher logits; the backbone is never run, trained, or put in training mode. Before training
   rows join replay, the student's view of them (confidence, agreement with the teacher) is
   recorded: the data of the learned gate, taken on traffic the student has not learned from.
5. On a schedule, the student is copied, a :class:`~earlyexit.gates.LearnedGate` is fitted, the
   copy's scores on the held-out evidence are recomputed (heads change, so stored scores would be
   stale), exits that save nothing are switched off (decided on a quarter of the evidence),
   thresholds are chosen by Learn-then-Test (:mod:`earlyexit.calibration`; by conformal risk
   control under ``guarantee="expected"``) on the other three quarters, tested once, and the copy is published together with its gate and
   thresholds (heads swapped as one ``ModuleList``: a served call never sees a half-trained head).
6. A drift monitor tests the audited agreement (pooled over exits in the default ``"joint"``
   calibration mode, per exit in ``"per_exit"`` mode); when it is provably below the target every
   gate closes (all traffic becomes evidence again) and stale evidence is dropped; gates reopen when
   the new evidence supports them. Under ``guarantee="expected"`` it tests the served
   disagreement (early and wrong, over all answers) against ``1 - target`` instead.

Learning is scheduled in samples and steps, never in wall-clock (:mod:`.schedule`): each stored
training row owes optimizer steps at the replay ratio in force, high while the heads still
improve (measured by their loss on fresh rows, before training on them), tapering to a small
steady-state ratio as that loss flattens, high again after a drift alarm. A synchronous learner
takes every owed step after each batch, so the same seed and stream give bit-identical heads and
thresholds on any machine load. The work is counted in MACs (head training ~3x the heads'
forward MACs per row, plus calibration work) next to the MACs served (``stats()
["learning_cost"]``). A wall-clock cap (``train_time_budget``, opt-in) may bound it further. In
background mode the serving thread only serves: the batch's bookkeeping (step 2's sorting and
everything after it) is queued for the background thread, which pays the steps owed.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .._threads import fixed_threads
from ..errors import BackgroundTrainingError, CheckpointError, ConfigError, InputError
from ..gates import AGREEMENT_FEATURES, Gate
from ..io import save_early_exit_model
from ..model import EarlyExitModel, ExitResult, ExitTrace
from .buffers import TensorRing, ring_layout
from .calibrator import Candidate, ExitState, PolicyCalibrator, typed_report
from .checkpoint import (
    STATE_VERSION,
    check_learner_state,
    compose_state,
    read_learner_checkpoint,
)
from .config import DistillConfig
from .drift import DriftAlarm, DriftMonitor
from .evidence import ContentSplit, Evidence
from .gate_data import MIN_GATE_SAMPLES, GateData
from .handover import Handover
from .mix import MixMonitor, MixShift
from .replica import HeadsRelease
from .rows import BatchRows, check_rows, sort_rows
from .schedule import Phase, PhaseStatus, Schedule
from .stats import LearnerStats, audited_agreement, exit_entries
from .traffic import TrafficCounters
from .trainer import MAX_OWED_STEPS, HeadTrainer, distillation_loss
from .undo import StepUndo
from .worker import BackgroundWorker

# Kept importable from here (their older home).
__all__ = ["STATE_VERSION", "BackgroundTrainingError", "OnlineDistiller", "distillation_loss"]

_T = TypeVar("_T")


class _Keep:
    """The type of :data:`KEEP`: an argument left as saved (where ``None`` is a value)."""

    def __repr__(self) -> str:
        return "KEEP"


#: Default of :meth:`OnlineDistiller.load`'s overrides: keep what the file says.
KEEP = _Keep()

#: Served batches a background learner may hold before the serving thread records them itself
#: (a bound on the memory of a lagging trainer, never a loss of traffic).
MAX_QUEUED_BATCHES = 64


def _work_clock() -> float:
    """The clock of learning work (the time budget's numerator): CPU time of the thread doing
    it; serving time (the denominator) is wall-clock. Waiting for a core, or for the interpreter
    lock that the serving thread and an HTTP event loop hold between operators, is not work:
    timed in wall-clock, a background learner's bookkeeping alone read as 39% of serving time
    under load and kept it over a 12% budget, so it stopped calibrating and training."""
    return time.thread_time()


#: Forward plus backward pass of a head, in multiples of its forward MACs (learning cost).
TRAIN_MACS_FACTOR = 3
#: Newton steps (at most) of a learned gate's fit, each ~``features**2`` MACs per row and exit.
GATE_FIT_STEPS = 50

#: Attributes of the traffic counters and the schedule a step may change (all but the sizes).
TRAFFIC_STATE = tuple(f.name for f in fields(TrafficCounters) if f.name != "num_exits")
SCHEDULE_STATE = tuple(f.name for f in fields(Schedule))


class OnlineDistiller:
    """Serve live traffic with an :class:`EarlyExitModel` and learn its exit heads from it.

    No labels and no training set: the teacher is the model's own final output on the traffic it
    serves. Gates stay closed until held-out, content-independent evidence shows (Learn-then-Test)
    that the samples they let out agree with the full model at ``config.target_agreement`` with
    ``config.confidence``: with the default ``calibration_mode="joint"`` that is the agreement
    pooled over every early answer (one shared threshold; a single exit may fall below the target
    if another is above it), with ``"per_exit"`` it is each exit's own agreement. With
    ``config.guarantee="expected"`` the promise is weaker and needs far less evidence: the
    expected disagreement of a served answer (early or not) with the full model is at most
    ``1 - target_agreement`` (conformal risk control; see :class:`DistillConfig`).

    Half-precision models (float16/bfloat16, cast before or after wrapping) learn too: the student
    and its optimizer are kept in float32, and heads are calibrated and published in the served
    heads' dtype and device.

    Args:
        eem: the wrapped model (from :func:`earlyexit.wrap`); its heads are replaced by trained
            copies when gates are recalibrated, its base model is never changed.
        config: a :class:`DistillConfig` (defaults: target 0.99 at 95% confidence, 5% audit).

    Parts (one job each, for inspection; the learner coordinates them under its locks):
        ``split`` (:class:`~earlyexit.distill.evidence.ContentSplit`), ``evidence``
        (:class:`~earlyexit.distill.evidence.Evidence`), ``trainer``
        (:class:`~earlyexit.distill.trainer.HeadTrainer`), ``gate_data``
        (:class:`~earlyexit.distill.gate_data.GateData`), ``calibrator``
        (:class:`~earlyexit.distill.calibrator.PolicyCalibrator`), ``drift``
        (:class:`~earlyexit.distill.drift.DriftMonitor`), ``traffic``
        (:class:`~earlyexit.distill.traffic.TrafficCounters`), ``schedule``
        (:class:`~earlyexit.distill.schedule.Schedule`), ``worker``
        (:class:`~earlyexit.distill.worker.BackgroundWorker`).

    Example:
        >>> import timm, torch, earlyexit as ee
        >>> eem = ee.wrap(timm.create_model("resnet18").eval())
        >>> learner = ee.OnlineDistiller(eem, ee.DistillConfig(target_agreement=0.99))
        >>> for x in stream:  # doctest: +SKIP
        ...     res = learner.step(x)  # served answers, in the caller's row order
        >>> learner.stats()["thresholds"]  # doctest: +SKIP
    """

    def __init__(self, eem: EarlyExitModel, config: DistillConfig | None = None) -> None:
        if not isinstance(eem, EarlyExitModel):
            raise ConfigError(
                f"OnlineDistiller needs an EarlyExitModel (ee.wrap(model)), got {type(eem).__name__}"
            )
        if config is None:
            config = DistillConfig()
        if not isinstance(config, DistillConfig):
            raise ConfigError(f"config must be a DistillConfig, got {type(config).__name__}")
        self.eem = eem
        self.config = config
        num_exits = eem.num_exits
        # _lock guards buffers, counters and the candidate slot; _train_lock the student and the
        # optimizer (held by the trainer for each step, by save() to get a consistent snapshot).
        self._lock = threading.RLock()
        self._train_lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self.split = ContentSplit(config.seed, config.calibration_fraction)
        self.evidence = Evidence(config)
        self.trainer = HeadTrainer(eem.heads, config, self._lock, self._train_lock)
        self.gate_data = GateData(num_exits)
        self.calibrator = PolicyCalibrator(eem, config)
        self.drift = DriftMonitor(
            num_exits,
            config.drift_window,
            config.target_agreement,
            config.drift_alpha,
            pooled=config.calibration_mode == "joint",
            served=config.guarantee == "expected",
        )
        self.mix = MixMonitor(eem.num_classes)
        self.traffic = TrafficCounters.empty(num_exits)
        self.schedule = Schedule()
        # Background mode: served batches waiting for the worker to record them (under _lock).
        self._queued: list[tuple[ExitResult, ExitTrace, Tensor, Tensor, float, float]] = []
        self.worker: BackgroundWorker[tuple[bool, bool] | list[Any]] = BackgroundWorker(
            self._wake, self._has_work, self._claim_work, self._run_work
        )
        self._reports: list[dict[str, Any]] = [
            {"state": ExitState.CLOSED, "reason": "warm-up: no calibration yet"}
            for _ in range(num_exits)
        ]
        self._expected_saving = 0.0
        self._phase = PhaseStatus(Phase.WARM_UP)
        self._collect_evidence = True
        self._calibration_due = False
        self._ready: Candidate | None = None
        self._undo: StepUndo | None = None  # set while a synchronous step runs
        if config.background:
            self.worker.start()

    # ------------------------------------------------------------------ serving and learning
    def step(self, x: Tensor) -> ExitResult:
        """Serve a batch of live traffic and learn from it; returns the served :class:`ExitResult`.

        A bad batch (wrong shape, dtype or device, NaN/Inf, empty) raises
        :class:`~earlyexit.InputError` before any state of the learner changes. A call that raises
        later (serving, bookkeeping, training or calibrating failed) leaves no trace either: in
        synchronous mode every part is put back as it was (:mod:`.undo`); in background mode the
        step returns once the batch is served, the background thread records it (only once
        everything it needs has been computed; :meth:`sync`, :meth:`save` and :meth:`close` wait
        for the batches served, ``stats()`` may lag a few batches), and a failure of that thread
        is raised on the next call as :class:`BackgroundTrainingError`. A background thread
        that lags ``MAX_QUEUED_BATCHES`` batches behind has the serving thread record the next
        ones itself: memory stays bounded and no batch goes uncounted.

        Rows whose teacher (the full model's logits) or stored head inputs are not finite (a
        finite but extreme input can overflow a model) are served flagged (``accepted=False``)
        and never teach, calibrate, feed the learned gate's data or the drift monitor; they are
        counted in ``stats()["non_finite_dropped"]``.

        Example:
            >>> res = learner.step(torch.randn(32, 3, 224, 224))  # doctest: +SKIP
            >>> res.exit_index  # doctest: +SKIP
        """
        work_started = _work_clock()
        self.worker.raise_error()
        self._validate(x)
        self._install_ready()
        gates_closed = all(t == math.inf for t in self.eem.thresholds)
        calibration_side = self.split.is_calibration(x)
        with self._lock:
            rng_state = self.evidence.rng.get_state()
            audit = self.evidence.draw_audits(calibration_side, gates_closed)
        audit, calibration_side = audit.to(x.device), calibration_side.to(x.device)
        before = _work_clock() - work_started  # checks, hashing, audit draws: learning work
        try:
            started = time.perf_counter()
            result, trace = self.eem.trace(x, audit=audit, input_checked=True)
            served = time.perf_counter() - started
            if self.worker.running:
                batch = (result, trace, audit, calibration_side, served, before)
                with self._wake:  # recorded by the worker, unless it lags far behind
                    queued = len(self._queued) < MAX_QUEUED_BATCHES
                    if queued:
                        self._queued.append(batch)
                        self._wake.notify_all()
                if not queued:
                    self._learn_from(*batch)
            else:
                with self._undone_on_failure():
                    self._learn_from(result, trace, audit, calibration_side, served, before)
        except BaseException:
            with self._lock:
                self.evidence.rng.set_state(rng_state)  # a failed call leaves no trace
            raise
        return result

    def _learn_from(
        self,
        result: ExitResult,
        trace: ExitTrace,
        audit: Tensor,
        calibration_side: Tensor,
        served: float,
        before: float,
    ) -> None:
        """Record the served batch, count its time, then train or calibrate if due (``before``:
        seconds of this batch's learning work already done, outside serving)."""
        started = _work_clock() - before
        rows = sort_rows(self.eem, self.config, result, trace, audit, calibration_side)
        self._record(rows, served, started)

    def fit(self, loader: Iterable[Any], epochs: int = 1) -> dict[str, Any]:
        """Learn from a finite unlabeled stream (the same machinery as :meth:`step`); returns stats.

        Batches may be tensors or ``(x, ...)`` tuples (labels, if any, are ignored). Evidence is
        collected in the first epoch only: a repeated sample is not new evidence. Ends with a
        calibration, so the heads served afterwards are the last ones trained.

        Example:
            >>> learner.fit(torch.utils.data.DataLoader(images, batch_size=64))  # doctest: +SKIP
        """
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
        try:
            for epoch in range(epochs):
                self._collect_evidence = epoch == 0
                for batch in loader:
                    x = batch[0] if isinstance(batch, tuple | list) else batch
                    self.step(x)
                self.wait_recorded()  # this epoch's batches count (or not) as evidence
        finally:
            self._collect_evidence = True
        self.sync()
        self.calibrate()
        return self.stats()

    def calibrate(self) -> dict[str, Any]:
        """Recalibrate the current student on the evidence now and publish it; returns stats.

        Example:
            >>> learner.calibrate()["thresholds"]  # doctest: +SKIP
        """
        self.worker.raise_error()
        with self._train_lock:
            self._timed(self._flush_pending)
            candidate = self._timed(self._make_candidate)
        self._publish(candidate)
        return self.stats()

    def sync(self, timeout: float | None = None) -> None:
        """Background mode: wait until the trainer has caught up with the traffic seen, and
        install its latest calibrated heads. A no-op in synchronous mode."""
        if not self.worker.running:
            return
        # Caught up: no job running and nothing left that the worker may do now (a calibration
        # that is due but not affordable under the time budget waits for more traffic).
        self.worker.wait_idle(
            lambda: not self.worker.busy and not self._has_work(), timeout=timeout
        )
        self.worker.raise_error()
        self._install_ready()

    # ------------------------------------------------------------------ serving elsewhere
    def record(self, rows: BatchRows, serve_seconds: float = 0.0) -> None:
        """Learn from a batch served elsewhere: the :class:`~.rows.BatchRows` a
        :class:`~earlyexit.distill.replica.ServingReplica` returned (features and teacher logits,
        never images), served in ``serve_seconds`` (the time budget's denominator).

        The same work as :meth:`step` after its model call: replicas serve, one learner learns
        from all of them and hands out :meth:`release`. A malformed ``rows`` raises
        :class:`~earlyexit.InputError` and changes nothing.

        Example:
            >>> result, rows = replica.serve(x)  # doctest: +SKIP
            >>> learner.record(rows, serve_seconds=0.012)  # doctest: +SKIP
        """
        started = _work_clock()
        self.worker.raise_error()
        check_rows(rows, self.eem.num_exits, self.eem.num_classes)
        if not math.isfinite(serve_seconds) or serve_seconds < 0:
            raise InputError(f"serve_seconds must be a finite number >= 0, got {serve_seconds!r}")
        if self.worker.running:
            self._record(rows, serve_seconds, started)
            return
        with self._undone_on_failure():
            self._record(rows, serve_seconds, started)

    @contextlib.contextmanager
    def _undone_on_failure(self) -> Iterator[None]:
        """One synchronous learning step at a time, put back as it was if it fails."""
        with self._train_lock:
            self._undo = self._begin_undo()
            try:
                yield
            except BaseException:
                with self._lock:
                    self._undo.undo()
                raise
            finally:
                self._undo = None

    def _record(self, rows: BatchRows, serve_seconds: float, started: float) -> None:
        """Store ``rows``, count the batch's time (learning work since ``started``; the serving
        time earns learning time, see :meth:`_budget_rate`), then train or calibrate if due."""
        probe = self._probe(rows)
        self._store(rows, probe)
        with self._lock:
            self.schedule.count_serving(rows.spent, sum(rows.counts))
            self.schedule.earn(serve_seconds, self._budget_rate(rows.counts))
            self.schedule.earn_macs(rows.spent, self._macs_rate(rows.counts))
            # Per-batch bookkeeping (checks, hashing, buffers) is learning work too: it counts
            # against the same budget as training, so the budget bounds the whole overhead.
            self.schedule.learn_seconds += _work_clock() - started
        self._after_batch()

    @property
    def heads_version(self) -> int:
        """Counts the changes to what is served: each publication of heads and thresholds, and
        each closing of every gate by the drift monitor (0 before either)."""
        return int(self.schedule.calibrations) + int(self.drift.alarms)

    def release(self) -> HeadsRelease:
        """What replicas should serve now: heads, gate, thresholds and audit share, stamped with
        :attr:`heads_version` (installs a candidate the background trainer has finished first).

        Example:
            >>> replica.install(learner.release())  # doctest: +SKIP
        """
        self.worker.raise_error()
        self._install_ready()
        with self._lock:
            eem = self.eem
            return HeadsRelease(
                version=self.heads_version,
                heads=eem.heads,
                gate=eem.gate,
                thresholds=tuple(eem.thresholds),
                audit_share=self.evidence.audit_share(),
            )

    def close(self) -> None:
        """Stop the background trainer (if any), once it has recorded the batches served. The
        learner can still serve synchronously."""
        self.wait_recorded()
        self.worker.stop()

    def wait_recorded(self) -> None:
        """Background mode: wait until the worker has recorded every batch served so far (the
        bookkeeping, not the training: quick), so :meth:`stats` counts every answered sample.
        :meth:`stats` itself never waits (a serving loop reads it after every batch). A no-op
        in synchronous mode.

        Example:
            >>> learner.wait_recorded(); learner.stats()["samples"]  # doctest: +SKIP
        """
        if self.worker.running:
            self.worker.wait_idle(lambda: not self._queued)

    def __enter__(self) -> OnlineDistiller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ one batch
    def take_over(self, handover: Handover) -> None:
        """Carry on from heads trained earlier on this traffic (a
        :meth:`HeadChooser.handover <earlyexit.distill.head_choice.HeadChooser.handover>`): its
        replay rows go into the replay (owing no steps: they were trained on), AdamW's state
        into the optimizer, and its evidence rows into the evidence. Call before the first
        :meth:`step`. Evidence rows must be held-out contents under this learner's content split
        (same ``seed`` and ``calibration_fraction``), never trained on and not used to choose
        anything about these heads: the chooser hands over exactly such rows.

        Raises:
            InputError: this learner has already served or stored rows; not one finite feature
                tensor per exit with the heads' shape, teacher logits that are not ``[M,
                num_classes]``, labels that are not class indices, optimizer states that do not
                fit the heads' parameters. Nothing is changed then.

        Example:
            >>> learner = ee.OnlineDistiller(chooser.wrap(), config)  # doctest: +SKIP
            >>> learner.take_over(chooser.handover())  # doctest: +SKIP
        """
        if not isinstance(handover, Handover):
            raise InputError(f"take_over expects a Handover, got {type(handover).__name__}")
        classes = self.eem.num_classes
        want = self._feature_shapes()
        evidence_z = self._checked_rows("evidence_z", handover.evidence_z, want)
        labels = handover.evidence_labels
        rows = evidence_z[0].shape[0] if evidence_z else 0
        if not isinstance(labels, Tensor) or labels.dtype != torch.long or labels.shape != (rows,):
            raise InputError(f"evidence_labels must be an int64 tensor of {rows} class indices")
        if rows and not (int(labels.min()) >= 0 and int(labels.max()) < classes):
            raise InputError(f"evidence_labels must be class indices in [0, {classes})")
        replay_z = self._checked_rows("replay_z", handover.replay_z, want)
        teacher = handover.replay_teacher
        kept = replay_z[0].shape[0] if replay_z else 0
        if not isinstance(teacher, Tensor) or tuple(teacher.shape) != (kept, classes):
            raise InputError(f"replay_teacher must be [{kept}, {classes}] teacher logits")
        if not teacher.is_floating_point() or not bool(torch.isfinite(teacher).all()):
            raise InputError("replay_teacher must hold finite floating-point logits")
        states = self._checked_optimizer_states(handover.optimizer_states)
        if isinstance(handover.trained_samples, bool) or not isinstance(
            handover.trained_samples, int
        ):
            raise InputError("trained_samples must be an int")
        with self._lock, self._train_lock:
            if self.traffic.samples or self.trainer.replay is not None:
                raise InputError(
                    "take_over must come before this learner serves or stores anything"
                )
            device = self.trainer.device
            if kept or rows:
                zs = [z[:1].to(device) for z in (replay_z if kept else evidence_z)]
                self._ensure_buffers(zs, torch.zeros(1, classes, device=device))
            if rows:
                self.evidence.add([z.to(device) for z in evidence_z], labels.to(device))
            if kept and self.trainer.replay is not None:
                self.trainer.replay.add(  # stored, owing nothing: the heads trained on them
                    **{f"z{i}": z.to(device) for i, z in enumerate(replay_z)},
                    teacher=teacher.to(device=device, dtype=torch.float32),
                )
            for head, head_states in zip(self.trainer.student, states, strict=True):
                for param, state in zip(head.parameters(), head_states, strict=True):
                    if state:
                        self.trainer.optimizer.state[param] = {
                            k: v.detach().clone().to(device) for k, v in state.items()
                        }
            self.trainer.trained_samples = handover.trained_samples

    def _checked_rows(self, name: str, zs: object, want: list[tuple[int, ...]]) -> list[Tensor]:
        """``zs`` checked: one finite float tensor per exit, the same row count, each row
        shaped as the heads' input at that exit."""
        num = self.eem.num_exits
        if not isinstance(zs, list | tuple) or len(zs) != num:
            raise InputError(f"{name}: expected one feature tensor per exit ({num})")
        rows = None
        for i, z in enumerate(zs):
            if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() < 1:
                raise InputError(f"{name}[{i}] must be a float tensor [N, ...]")
            rows = z.shape[0] if rows is None else rows
            if z.shape[0] != rows:
                raise InputError(f"{name}[{i}] has {z.shape[0]} rows, {name}[0] {rows}")
            if z.shape[0] and tuple(z.shape[1:]) != want[i]:
                raise InputError(
                    f"{name}[{i}] rows have shape {tuple(z.shape[1:])}, expected {want[i]} (what "
                    f"eem.heads[{i}].reduce returns at this exit)"
                )
            if not bool(torch.isfinite(z).all()):
                raise InputError(f"{name}[{i}] holds NaN or Inf values")
        return list(zs)

    def _checked_optimizer_states(self, states: object) -> list[list[dict[str, Tensor]]]:
        """AdamW states per head and parameter, checked against the student's parameters."""
        heads = list(self.trainer.student)
        if not isinstance(states, list | tuple) or len(states) != len(heads):
            raise InputError(f"optimizer_states: expected one list per exit ({len(heads)})")
        for i, (head, head_states) in enumerate(zip(heads, states, strict=True)):
            params = list(head.parameters())
            if not isinstance(head_states, list | tuple) or len(head_states) != len(params):
                raise InputError(
                    f"optimizer_states[{i}]: expected one state per parameter ({len(params)})"
                )
            for j, (param, state) in enumerate(zip(params, head_states, strict=True)):
                if not state:
                    continue
                if not isinstance(state, dict) or set(state) != {"step", "exp_avg", "exp_avg_sq"}:
                    raise InputError(
                        f"optimizer_states[{i}][{j}] must be AdamW state (step, exp_avg, "
                        "exp_avg_sq) or empty"
                    )
                for key in ("exp_avg", "exp_avg_sq"):
                    value = state[key]
                    if not isinstance(value, Tensor) or value.shape != param.shape:
                        raise InputError(
                            f"optimizer_states[{i}][{j}].{key} must have the parameter's shape "
                            f"{tuple(param.shape)}"
                        )
                    if not bool(torch.isfinite(value).all()):
                        raise InputError(f"optimizer_states[{i}][{j}].{key} is not finite")
        return [list(h) for h in states]

    def _feature_shapes(self) -> list[tuple[int, ...]]:
        """Per exit, the shape of one row of the heads' input ``z`` (from the rings once they
        exist, else from one traced zero image run to the end)."""
        ring = self.evidence.ring
        if ring is not None:
            return [tuple(ring.fields[f"z{i}"][0]) for i in range(self.eem.num_exits)]
        param = next(self.eem.heads.parameters(), None)
        x = torch.zeros(1, *self.eem.input_size)
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            _, trace = self.eem.trace(x, audit=torch.ones(1, dtype=torch.bool))
        return [tuple(r.z.shape[1:]) if r is not None else () for r in trace.exits]

    def _validate(self, x: object) -> None:
        self.eem.check_input(x)  # shape, dtype, device, NaN/Inf: clear InputErrors
        assert isinstance(x, Tensor)
        if x.shape[0] == 0:
            raise InputError("empty batch: there is nothing to serve or learn from")
        if self.eem.base_model.training:
            raise InputError("the base model is in training mode; call model.eval() before serving")

    def _probe(self, rows: BatchRows) -> float | None:
        """The student's fresh loss on the training rows of ``rows`` that go straight to replay
        (fixed gate, or later epochs of :meth:`fit`); ``None`` when there are none (rows held
        back for the learned gate are measured when they are flushed)."""
        if rows.zs is None or not bool(rows.train.any()):
            return None
        if self.config.gate == "learned" and self._collect_evidence:
            return None
        zs, teacher = [z[rows.train] for z in rows.zs], rows.teacher[rows.train]
        logits = self.trainer.classify(zs)
        with self._lock:
            self.schedule.count_learning(teacher.shape[0] * self._head_macs, calibration=True)
        return self.trainer.fresh_loss(logits, teacher)

    @property
    def _training_head_macs(self) -> int:
        """Forward MACs per row of the heads a training step trains (dormant heads excluded)."""
        return self.trainer.active_head_macs(self.eem.head_macs)

    @property
    def _head_macs(self) -> int:
        """Forward MACs of every head on one row (what learning pays per row seen)."""
        return sum(self.eem.head_macs)

    def _owe_steps(self, zs: list[Tensor], teacher: Tensor, loss: float | None) -> None:
        """Let training rows into replay: their fresh ``loss`` (summed, before training on them)
        moves the schedule first, then they owe steps at the ratio in force (call under _lock)."""
        cfg = self.config
        schedule = self.schedule
        if loss is not None:
            schedule.observe(loss, teacher.shape[0], cfg.plateau_window, cfg.plateau_tolerance)
        self._before_write(self.trainer.replay, teacher.shape[0])
        ratio = schedule.replay_ratio(cfg.warmup_replay_ratio, cfg.replay_ratio)
        # Synchronous: every owed step is taken after this batch, none is ever dropped.
        cap = MAX_OWED_STEPS if self.worker.running else math.inf
        self.trainer.add(zs, teacher, ratio, cap)

    def _store(self, rows: BatchRows, probe: float | None = None) -> None:
        """Count the batch, check its audited answers, and route what ran to the end to the
        evidence (held-out contents that were audited) or to training (the other contents).

        Everything is computed first (:func:`~.rows.sort_rows`); the learner changes only once
        nothing is left to fail."""
        with self._lock:
            if rows.zs is not None:
                self._ensure_buffers(rows.zs, rows.teacher)
            self.traffic.record_batch(rows.counts, rows.spent)
            self.traffic.non_finite_dropped += rows.dropped
            for e, ok in rows.audits:
                self.traffic.record_audit(e, ok)
                self.drift.record(e, ok)
            if rows.zs is None:
                return
            zs, teacher = rows.zs, rows.teacher
            evidence, train = rows.evidence, rows.train
            if self._collect_evidence and bool(evidence.any()):
                self._before_write(self.evidence.ring, int(evidence.sum()))
                self.evidence.add([z[evidence] for z in zs], teacher[evidence].argmax(dim=-1))
            if bool(train.any()):
                rows_z, rows_teacher = [z[train] for z in zs], teacher[train]
                if self.config.gate == "learned" and self._collect_evidence:
                    # Held back from replay until the student's view of them is recorded.
                    self.gate_data.hold(rows_z, rows_teacher)
                else:
                    self._owe_steps(rows_z, rows_teacher, probe)
            if rows.audits:
                share = sum(self.traffic.recent_exit_rates()) if self.drift.served else None
                alarm = self.drift.check(share)
                if alarm is not None:
                    self._on_drift(alarm)
            if rows.classes is not None:
                shift = self.mix.record(rows.classes)
                if shift is not None and any(t < math.inf for t in self.eem.thresholds):
                    self._on_mix_shift(shift)

    def _ensure_buffers(self, zs: list[Tensor], teacher: Tensor) -> None:
        """Allocate replay, evidence and gate data at the first sample, within the memory cap
        (all three or none: an allocation that fails leaves the learner as it was)."""
        if self.trainer.replay is not None:
            return
        learned_gate = self.config.gate == "learned"
        fields, caps = ring_layout(self.config, zs, teacher.shape[1], learned_gate)
        device = teacher.device
        try:
            self.trainer.build(fields, teacher.shape[1], caps["replay"], device)
            self.evidence.build(fields, caps["evidence"], device)
            if learned_gate:
                self.gate_data.build(caps["gate"], device)
        except BaseException:
            self.trainer.replay = self.evidence.ring = self.gate_data.ring = None
            raise

    def _begin_undo(self) -> StepUndo:
        """Keep what a synchronous step may change, so a step that fails can be undone."""
        undo = StepUndo()
        undo.keep_attributes(self.traffic, TRAFFIC_STATE)
        undo.keep_attributes(self.drift, ("windows", "alarms"))
        undo.keep_attributes(self.mix, ("reference", "window", "window_samples", "alarms"))
        undo.keep_attributes(self.schedule, SCHEDULE_STATE)
        undo.keep_attributes(
            self.trainer,
            ("replay", "credit", "step_seconds", "last_loss", "train_steps", "trained_samples"),
        )
        undo.keep_attributes(self.trainer, ("rng",))
        undo.keep_attributes(self.evidence, ("ring",))
        undo.keep_attributes(self.calibrator, ("_scored",))  # logits of evidence rows undone
        undo.keep_attributes(self.gate_data, ("ring", "pending", "pending_rows"))
        undo.keep_attributes(
            self, ("_reports", "_expected_saving", "_phase", "_calibration_due", "_ready")
        )
        eem = self.eem
        heads, gate, thresholds = eem.heads, eem.gate, eem.thresholds

        def serve_as_before() -> None:
            eem.set_thresholds([math.inf] * eem.num_exits)  # never old thresholds on new heads
            eem.heads = heads
            eem.gate = gate
            eem.set_thresholds(thresholds)

        undo.keep(serve_as_before)
        return undo

    def _before_write(self, ring: TensorRing | None, rows: int) -> None:
        """A ring is about to take ``rows`` rows: keep what they overwrite (synchronous steps)."""
        if self._undo is not None:
            self._undo.ring_write(ring, rows)

    def _before_clear(self, ring: TensorRing | None) -> None:
        """A ring is about to be cleared: keep where it was (synchronous steps)."""
        if self._undo is not None:
            self._undo.ring_clear(ring)

    def _after_batch(self) -> None:
        """Schedule training and calibration (inline, or hand them to the background thread)."""
        with self._wake:  # the lock behind _wake guards the counters and the schedule
            cfg = self.config
            if self.schedule.calibration_due(
                self.traffic.samples, cfg.warmup_samples, cfg.recalibrate_every
            ):
                self._calibration_due = True
            if self.worker.running:
                self._wake.notify_all()
                return
            # Synchronous: calibrate on schedule (the caller waits for it; the budget is the
            # background thread's pacing).
            due, self._calibration_due = self._calibration_due, False
        if self._flush_due(due):
            self._timed(self._flush_pending)
        if self._may_train():
            # One intra-op thread: head training is many tiny ops, which the thread pool only
            # slows down (far more on a shared machine). Serving keeps its threads.
            with fixed_threads(1):
                while self._may_train():
                    self.trainer.claim_step()
                    self._train_step()
        if due:
            self._publish(self._timed(self._make_candidate))

    def _may_train(self) -> bool:
        if not self.trainer.may_train(self.schedule.learn_seconds, self.schedule.allowance_seconds):
            return False
        if self.config.learn_macs_budget is None:
            return True
        step = TRAIN_MACS_FACTOR * self.config.batch_size * self._training_head_macs
        return self.schedule.macs_affordable(step)

    def _macs_rate(self, counts: list[int]) -> float:
        """Learning MACs a served MAC earns (``counts``: the batch's samples per path): the
        share the full model answered earns ``closed_macs_budget``, the rest ``learn_macs_budget``
        (see :class:`DistillConfig`); 0 without a MAC budget (nothing is checked then)."""
        steady = self.config.learn_macs_budget
        if steady is None:
            return 0.0
        ran_to_end = counts[-1] / max(sum(counts), 1)
        return steady + max(0.0, self.config.closed_macs_budget - steady) * ran_to_end

    def _calibration_affordable(self) -> bool:
        """Background mode: a calibration is due and the time budget allows it (under the lock)."""
        if not self._calibration_due:
            return False
        return self.config.train_time_budget is None or self.schedule.affordable(0.0)

    def _budget_rate(self, counts: list[int]) -> float:
        """Learning seconds a second of serving a batch earns (``counts``: its samples per path).
        In background mode the share the full model answered (all of it while every gate is
        closed: no saving, and only learning can make one) earns ``closed_time_budget``; a
        synchronous step's learning delays its own answers, so it earns the plain budget."""
        budget = self.config.train_time_budget or 0.0
        if not self.worker.running:
            return budget
        ran_to_end = counts[-1] / max(sum(counts), 1)
        return budget + max(0.0, self.config.closed_time_budget - budget) * ran_to_end

    def _flush_due(self, calibrating: bool) -> bool:
        return self.gate_data.flush_due(self.trainer.trained_samples, calibrating)

    def _timed(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn``, counting its time as learning time (the budget's numerator)."""
        started = _work_clock()
        try:
            return fn()
        finally:
            with self._lock:
                self.schedule.learn_seconds += _work_clock() - started

    # ------------------------------------------------------------------ training and the gate
    def _train_step(self) -> None:
        if self._undo is not None:  # the step's first update: keep the student as it was
            self._undo.keep_module(self.trainer.student, self.trainer.optimizer)
        started = _work_clock()
        rows = self._timed(self.trainer.train_step)
        took = _work_clock() - started
        with self._lock:  # a running mean of what a step costs, for the budget check
            self.trainer.record_step_seconds(took)
            self.schedule.count_learning(TRAIN_MACS_FACTOR * rows * self._training_head_macs)

    def _flush_pending(self) -> None:
        """Record how the student sees the training rows held back since the last flush (it has
        never trained on them: the learned gate's training data), then let them into replay.
        Done in blocks of a few hundred rows: one pass per block, not a dozen tiny ones. The
        rows stay pending until the student has seen them (a failure there loses none)."""
        with self._train_lock:  # one flush at a time: a block is recorded once
            with self._lock:
                taken = len(self.gate_data.pending)
                block = self.gate_data.peek_pending()
            if block is None:
                return
            zs, teacher = block
            target = teacher.argmax(dim=-1)
            logits = self.trainer.classify(zs)
            loss = self.trainer.fresh_loss(logits, teacher)
            with self._lock:
                self.gate_data.release_pending(taken)
                self._before_write(self.gate_data.ring, teacher.shape[0])
                self.gate_data.record(logits, target)
                rows = teacher.shape[0]
                self.schedule.count_learning(rows * self._head_macs, calibration=True)
                self._owe_steps(zs, teacher, loss)

    def _fit_gate(self) -> tuple[Gate, str]:
        """The gate to calibrate and serve with the next heads, and a word on how it was chosen."""
        if self.config.gate == "fixed":
            return self.eem.gate, "the gate given to ee.wrap"
        with self._lock:
            data = self.gate_data.snapshot()
        return GateData.fit(data)

    # ------------------------------------------------------------------ calibration and publishing
    def _make_candidate(self) -> Candidate:
        """Copy the student and calibrate the copy on the held-out evidence (call under the train
        lock). Too little evidence for even the most lenient test: nothing can open, so skip the
        work (warm-up recalibrates several times before the first gate can open)."""
        need = self.calibrator.evidence_needed()
        with self._lock:
            epoch = self.schedule.epoch
            have = len(self.evidence)
            if have < need:
                return self.calibrator.closed(have, epoch)
            data = self.evidence.snapshot()
            ring = self.evidence.ring
            # The student changes only by training steps (under the train lock we hold).
            steps = self.trainer.train_steps
            rows_key = ((epoch, steps), ring.head, ring.added)
            scored = self.schedule.rows_to_score(epoch, steps, ring.added, have)
        heads = self.trainer.copy_student(self.eem.training, like=self.eem.heads)
        gate, gate_note = self._fit_gate()
        candidate = self.calibrator.candidate(heads, gate, gate_note, data, epoch, rows_key)
        with self._lock:
            self.schedule.count_learning(self._calibration_macs(scored), calibration=True)
            self.schedule.mark_scored(epoch, steps, ring.added)
        return candidate

    def _calibration_macs(self, rows: int) -> int:
        """MACs of one calibration that scores ``rows`` evidence rows (every head on each: all
        rows when the heads trained since the last calibration, else the rows added since, as
        the calibrator's cache does; see ``Schedule.rows_to_score``), plus the learned gate's fit
        (an upper bound too: every Newton step, ``features**2`` per row and exit). Selecting
        exits and testing thresholds on the scores is counted as free (passes over ``[N, E]``
        numbers)."""
        macs = rows * self._head_macs
        if self.config.gate == "learned":
            ring = self.gate_data.ring
            fitted = len(ring) if ring is not None else 0
            if fitted >= MIN_GATE_SAMPLES:
                features = len(AGREEMENT_FEATURES)
                macs += GATE_FIT_STEPS * fitted * self.eem.num_exits * features * features
        return macs

    def _publish(self, candidate: Candidate) -> None:
        """Serve ``candidate``: its heads and its thresholds, never one without the other."""
        with self._lock:
            if candidate.epoch != self.schedule.epoch:
                return  # calibrated on evidence a drift alarm has since voided
            eem = self.eem
            for p in candidate.heads.parameters():
                p.requires_grad_(False)
            # Close first, swap the whole head list in one assignment, then open: a concurrent
            # call sees old heads + old thresholds, closed gates, or new heads + new thresholds.
            eem.set_thresholds([math.inf] * eem.num_exits)
            eem.heads = candidate.heads
            eem.gate = candidate.gate  # after the heads: serving reads heads, then the gate
            eem.set_thresholds(candidate.thresholds)
            self._reports = candidate.reports
            self._expected_saving = candidate.expected_mac_saving
            # An exit switched off calibration after calibration stops costing learning MACs.
            self.trainer.note_switched_off(
                [r.get("state") == ExitState.SWITCHED_OFF for r in candidate.reports],
                self.config.dormant_after,
            )
            self.schedule.calibrations += 1
            self.traffic.reset_publish()
            opened = any(t < math.inf for t in candidate.thresholds)
            if opened and self.schedule.first_open_sample is None:
                self.schedule.first_open_sample = self.traffic.samples
            # The mix monitor watches served answers against the evidence just calibrated on.
            ring = self.evidence.ring
            self.mix.set_reference(ring.view()["teacher"] if opened and ring is not None else None)
            if opened:
                self._phase = PhaseStatus(Phase.SERVING)
            elif self._phase.phase is Phase.SERVING:
                self._phase = PhaseStatus(Phase.CLOSED, "evidence no longer supports any gate")

    def _install_ready(self) -> None:
        with self._lock:
            candidate, self._ready = self._ready, None
        if candidate is not None:
            self._publish(candidate)

    def _on_mix_shift(self, shift: MixShift) -> None:
        """The served class mix left the evidence's: the thresholds were proven on traffic that
        no longer comes. Close every gate and void the evidence (the heads keep what they learned:
        each class still looks the same); gates reopen once evidence from the new mix supports
        them (call under _lock)."""
        self._void_evidence(forget=False)
        self._phase = PhaseStatus(
            Phase.DRIFT, f"{shift}; all gates closed until new evidence supports them"
        )
        for report in self._reports:
            report.update(state=ExitState.CLOSED, reason="closed by the mix monitor")

    def _on_drift(self, alarm: DriftAlarm) -> None:
        """Close every gate, void the evidence (and, with ``forget_on_drift``, what the heads
        were learning from); gates reopen once new evidence supports them (call under _lock)."""
        self._void_evidence(forget=self.config.forget_on_drift)
        self.drift.acknowledge()
        self._phase = PhaseStatus(
            Phase.DRIFT,
            f"{alarm.where} agreed on {alarm.n - alarm.failures}/{alarm.n} audited samples, "
            + (
                f"so served disagreement is above {1 - self.config.target_agreement:.4g}"
                if alarm.exit_share is not None
                else f"below {self.config.target_agreement}"
            )
            + "; all gates closed until new evidence supports them",
        )
        for report in self._reports:
            report.update(state=ExitState.CLOSED, reason="closed by the drift monitor")

    def _void_evidence(self, forget: bool) -> None:
        """Close every gate and start a new evidence epoch (``forget``: drop the replay too, so
        the heads learn only from what comes next); learn hard again (call under _lock)."""
        self.schedule.epoch += 1
        self.eem.set_thresholds([math.inf] * self.eem.num_exits)
        self.mix.set_reference(None)
        self._before_clear(self.evidence.ring)
        self.evidence.clear()
        if forget and self.trainer.replay is not None:
            self._before_clear(self.trainer.replay)
            self._before_clear(self.gate_data.ring)
            self.trainer.forget()
            # How confidence maps to agreement may have moved too.
            self.gate_data.forget()
        self.drift.clear()  # only audits from now on count
        self.schedule.restart_learning()  # learn hard again: the traffic has moved
        self.trainer.wake_all()  # what did not pay on the old traffic may pay on the new
        self._ready = None
        # Gather a fresh round of evidence before reopening.
        self.schedule.last_calibration = self.traffic.samples
        self.traffic.reset_publish()

    # ------------------------------------------------------------------ background mode
    def _has_work(self) -> bool:
        return (
            bool(self._queued)
            or self._may_train()
            or self._calibration_affordable()
            or self._flush_due(False)
        )

    def _claim_work(self) -> tuple[bool, bool] | list[Any]:
        """What the worker does next, decided under the lock: record the batches served so far
        (first: they decide what is due), else (calibrate, train)."""
        if self._queued:
            return list(self._queued)  # dropped from the queue once recorded
        calibrate = self._calibration_affordable()
        train = self._may_train()
        if train:
            self.trainer.claim_step()
        return calibrate, train

    def _run_work(self, job: tuple[bool, bool] | list[Any]) -> None:
        if isinstance(job, list):  # batches served: their bookkeeping, off the serving thread
            for batch in job:
                self._learn_from(*batch)
                with self._lock:
                    self._queued.pop(0)
            return
        calibrate, train = job
        if self._flush_due(calibrate):
            self._timed(self._flush_pending)
        if train:
            self._train_step()
        if calibrate:
            with self._train_lock:
                candidate = self._timed(self._make_candidate)
            with self._wake:
                self._ready = candidate
                self._calibration_due = False

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        """What the learner has seen and decided (JSON-serialisable).

        Keys: ``samples``, ``phase``, ``exit_rates`` (per exit, over the last ~2048 samples
        served), ``audited_agreement`` and ``audited_lower_bound`` (per exit: share of the latest
        ``drift_window`` audited early answers that agree with the full model, and its one-sided
        lower bound at ``confidence``), ``thresholds``, ``mac_saving`` (1 - MACs actually spent on
        the last ~2048 samples, audits included, over the base model's), ``expected_mac_saving``
        (the current policy on held-out evidence), ``exits`` (per exit: state, the reason for it,
        the numbers above), buffer/training counters, and ``non_finite_dropped`` (samples that
        ran to the end with a non-finite teacher or stored features: served flagged, never used
        to teach, calibrate, fit the gate or watch for drift; saved with the learner), ``guarantee``
        (which promise the thresholds carry: ``"high_probability"`` or ``"expected"``, see
        :class:`DistillConfig`), ``first_open_sample`` (samples served when a gate first
        opened, ``None`` before; saved with the learner), ``head_time_fractions`` (with
        ``head_cost="time"``: what exit selection prices each head at, as a share of the base
        model's batch-1 time; ``None`` before it is known), ``dormant_exits`` (exits whose heads
        stopped training after ``dormant_after`` calibrations switched off), ``mix_shifts`` (alarms of the mix
        monitor: the served class mix left the evidence's, see :mod:`~earlyexit.distill.mix`),
        ``replay_ratio`` (replay samples each stored row owes now: the learning schedule) and
        ``learning_cost`` (learning work next to serving: ``macs_ratio_total``, ``macs_ratio_recent`` over the last 2048-4096
        samples served, ``seconds_ratio_total``, and the MAC counts; see
        :meth:`~earlyexit.distill.schedule.Schedule.learning_cost`). Built from a
        :class:`~earlyexit.distill.stats.LearnerStats`.

        Example:
            >>> learner.stats()["mac_saving"]  # doctest: +SKIP
            0.41
        """
        with self._lock:
            traffic = self.traffic
            cfg = self.config
            eem = self.eem
            num_exits = eem.num_exits
            base = eem.base_macs
            exit_rates = traffic.recent_exit_rates()
            agreement = audited_agreement(self.drift, traffic, num_exits, cfg.confidence)
            thresholds = list(eem.thresholds)
            exits = exit_entries(eem, thresholds, exit_rates, agreement, self._reports)
            replay = self.trainer.replay
            rings = (replay, self.evidence.ring, self.gate_data.ring)
            return LearnerStats(
                samples=traffic.samples,
                phase=str(self._phase),
                exit_rates=exit_rates,
                exit_rates_total=traffic.total_exit_rates(),
                audited_agreement=[a["agreement"] for a in agreement],
                audited_lower_bound=[a["lower_bound"] for a in agreement],
                thresholds=thresholds,
                gate=repr(eem.gate),
                mac_saving=traffic.recent_mac_saving(base),
                mac_saving_total=traffic.total_mac_saving(base),
                expected_mac_saving=self._expected_saving,
                target_agreement=cfg.target_agreement,
                confidence=cfg.confidence,
                guarantee=cfg.guarantee,
                exits=exits,
                evidence=len(self.evidence),
                replay=len(replay) if replay is not None else 0,
                memory_bytes=sum(r.nbytes for r in rings if r is not None),
                train_steps=self.trainer.train_steps,
                loss=self.trainer.last_loss,
                calibrations=self.schedule.calibrations,
                drift_alarms=self.drift.alarms,
                mix_shifts=self.mix.alarms,
                dormant_exits=sorted(self.trainer.dormant),
                non_finite_dropped=traffic.non_finite_dropped,
                first_open_sample=self.schedule.first_open_sample,
                head_time_fractions=(
                    None
                    if self.calibrator.head_time_fractions is None
                    else list(self.calibrator.head_time_fractions)
                ),
                replay_ratio=self.schedule.replay_ratio(cfg.warmup_replay_ratio, cfg.replay_ratio),
                learning_cost=self.schedule.learning_cost(traffic.macs),
            ).to_dict()

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the model (heads, thresholds, fingerprint) and everything needed to resume learning
        (student heads, optimizer, buffers, counters, random states) to one file, atomically.

        ``ee.load(model, path)`` reads the same file as a plain :class:`EarlyExitModel`.

        Example:
            >>> learner.save("learner.safetensors")  # doctest: +SKIP
            >>> learner = OnlineDistiller.load(model, "learner.safetensors")  # doctest: +SKIP
        """
        self.wait_recorded()
        with self._train_lock, self._lock:
            tensors, state = self.state_dict()
            save_early_exit_model(
                self.eem, path, extra_tensors=tensors, extra_config={"distill": state}
            )

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and JSON that capture the learner exactly: the sum of its parts' states.

        The layout is state version 1 (the keys :meth:`save` writes and :meth:`load` reads).

        Example:
            >>> tensors, state = learner.state_dict()  # doctest: +SKIP
            >>> state["counters"]["samples"]  # doctest: +SKIP
        """
        with self._train_lock, self._lock:
            learner = {
                "version": STATE_VERSION,
                "config": self.config.to_dict(),
                "reports": [dict(report) for report in self._reports],
                "expected_mac_saving": self._expected_saving,
                "phase": str(self._phase),
            }
            return compose_state(
                [
                    ({}, learner),
                    self.traffic.state_dict(),
                    self.trainer.state_dict(),
                    self.evidence.state_dict(),
                    self.gate_data.state_dict(),
                    self.calibrator.state_dict(),
                    self.drift.state_dict(),
                    self.schedule.state_dict(),
                ]
            )

    def load_state_dict(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (each part takes its own keys). The whole
        state is checked first (:func:`~earlyexit.distill.checkpoint.check_learner_state`): a
        bad one raises :class:`~earlyexit.CheckpointError` and changes nothing."""
        with self._train_lock, self._lock:
            check_learner_state(tensors, state, self.trainer.student, self.eem.num_classes)
            self.trainer.load_state_dict(tensors, state)
            device = self.trainer.device
            self.evidence.load_state_dict(tensors, state, device)
            self.gate_data.load_state_dict(tensors, state, device)
            self.drift.load_state_dict(tensors, state)
            self.calibrator.load_state_dict(tensors, state)
            self.traffic.load_state_dict(tensors, state)
            self.schedule.load_state_dict(tensors, state, self.config.train_time_budget)
            self._reports = [typed_report(report) for report in state["reports"]]
            self._expected_saving = float(state["expected_mac_saving"])
            self._phase = PhaseStatus.parse(str(state["phase"]))

    @classmethod
    def load(
        cls,
        model: nn.Module | EarlyExitModel,
        path: str | Path,
        *,
        background: bool | None = None,
        train_time_budget: float | _Keep | None = KEEP,
    ) -> OnlineDistiller:
        """Resume a learner saved with :meth:`save`, on the base model (or an ``EarlyExitModel`` of
        it) it was trained on.

        Args:
            model: the base classifier, or an :class:`EarlyExitModel` wrapping it with the same
                exits (its heads and thresholds are overwritten with the saved ones).
            path: the file :meth:`save` wrote.
            background: override ``config.background``.
            train_time_budget: override ``config.train_time_budget`` (``None``: no wall-clock
                cap); by default the saved one. Both only pace the learning: the evidence,
                buffers and guarantee are resumed as saved.

        Example:
            >>> learner = OnlineDistiller.load(model, "learner.safetensors")  # doctest: +SKIP
        """
        eem, tensors, state = read_learner_checkpoint(model, path)
        cfg_dict = dict(state["config"])
        if background is not None:
            cfg_dict["background"] = bool(background)
        if not isinstance(train_time_budget, _Keep):
            cfg_dict["train_time_budget"] = train_time_budget
        wants_background = cfg_dict["background"]
        cfg_dict["background"] = False  # start the thread only once the state is in place
        learner = cls(eem, DistillConfig.from_dict(cfg_dict))
        try:
            learner.load_state_dict(tensors, state)
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{str(path)!r} learner state is incomplete: {err}") from err
        # Validated as a whole, then set on the config object every part shares.
        DistillConfig.from_dict({**cfg_dict, "background": wants_background})
        learner.config.background = wants_background
        if wants_background:
            learner.worker.start()
        return learner
