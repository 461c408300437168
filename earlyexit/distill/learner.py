"""OnlineDistiller: exit heads learned from live traffic, gates opened only on audited evidence.

How it works (one call of :meth:`OnlineDistiller.step`):

1. The batch is served by ``eem.trace``: confident samples leave early, the others run to the end,
   and every head is evaluated on every sample reaching it, so the pooled input ``z`` of every head
   is known for every sample that ran to the end, next to the full model's logits (the teacher).
   No second backbone pass is ever made for learning.
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
   thresholds are chosen by Learn-then-Test (:mod:`earlyexit.calibration`) on the other three
   quarters, tested once, and the copy is published together with its gate and
   thresholds (heads swapped as one ``ModuleList``: a served call never sees a half-trained head).
6. A drift monitor tests the audited agreement of each exit; when it is provably below the target
   every gate closes (all traffic becomes evidence again) and stale evidence is dropped; gates reopen
   when the new evidence supports them.

All learning work (bookkeeping, training, calibration) shares one wall-clock budget,
``train_time_budget`` of the time spent serving.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from scipy import stats as scipy_stats
from torch import Tensor, nn

from .._threads import fixed_threads
from ..calibration import (
    TOLERATED_FAILURES,
    CalibrationResult,
    calibrate_joint,
    calibrate_thresholds,
    clopper_pearson_lower,
    empirical_joint_thresholds,
    min_evidence,
    simulate_exits,
)
from ..errors import CheckpointError, ConfigError, EarlyExitError, InputError
from ..gates import (
    AGREEMENT_FEATURES,
    Gate,
    GateContext,
    LearnedGate,
    agreement_features,
    fit_learned_gate,
    make_gate,
)
from ..io import fingerprint, read_checkpoint, restore, save_early_exit_model
from ..model import EarlyExitModel, ExitResult, ExitTrace
from .buffers import TensorRing
from .config import DistillConfig

STATE_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Side of the pooled thumbnail hashed to route a sample's content to train or calibration.
_HASH_SIDE = 8
#: Optimizer steps a lagging background trainer may owe before new traffic stops adding more.
_MAX_OWED_STEPS = 64.0
#: Training rows held back (learned gate) before the student's view of them is recorded at once.
_PENDING_FLUSH = 256
#: Fewest training-side samples the learned gate is fitted on (below: max softmax).
_MIN_GATE_SAMPLES = 128
#: Every this-many-th evidence row chooses which exits stay on; the others test the thresholds.
_SELECT_EVERY = 4
#: Served samples the exit rates and MAC saving of :meth:`OnlineDistiller.stats` look back on.
_STATS_WINDOW = 2048


def _classify_all(heads: Sequence[nn.Module], zs: Sequence[Tensor]) -> list[Tensor]:
    """Every head's logits on its stored input ``z`` (no backbone pass, no autograd)."""
    with torch.no_grad():
        return [head.classify(z.float()) for head, z in zip(heads, zs, strict=True)]


def _agreement(logits: Sequence[Tensor], target: Tensor) -> Tensor:
    """``[N, E]`` bool: whether each head's argmax is the full model's answer ``target``."""
    return torch.stack([out.argmax(dim=-1) == target for out in logits], dim=1)


class BackgroundTrainingError(EarlyExitError, RuntimeError):
    """The background trainer failed; raised by the next :meth:`OnlineDistiller.step`."""


def distillation_loss(
    student: Tensor, teacher: Tensor, temperature: float = 2.0, hard_label_weight: float = 0.0
) -> Tensor:
    """KL(teacher || student) on temperature-softened distributions, times ``T**2`` (so gradients
    keep their scale across temperatures), optionally mixed with cross-entropy on the teacher's
    argmax.

    Example:
        >>> t = torch.randn(4, 10)
        >>> float(distillation_loss(t.clone(), t)) < 1e-6
        True
    """
    t = temperature
    s_log = F.log_softmax(student.float() / t, dim=-1)
    t_log = F.log_softmax(teacher.float() / t, dim=-1)
    loss = F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * (t * t)
    if hard_label_weight > 0:
        hard = F.cross_entropy(student.float(), teacher.argmax(dim=-1))
        loss = (1.0 - hard_label_weight) * loss + hard_label_weight * hard
    return loss


@dataclass
class _Candidate:
    """Heads and the thresholds calibrated for exactly those heads, ready to be published."""

    heads: nn.ModuleList
    gate: Gate
    thresholds: tuple[float, ...]
    reports: list[dict[str, Any]]
    expected_mac_saving: float
    evidence: int
    epoch: int


@dataclass
class _Counters:
    """Everything counted about served traffic (plain ints, saved with the learner)."""

    samples: int = 0
    exits: list[int] = field(default_factory=list)  # per path (E + 1), all time
    exits_since_publish: list[int] = field(default_factory=list)
    samples_since_publish: int = 0
    audited: list[int] = field(default_factory=list)  # audited early exits per exit, all time
    audited_agree: list[int] = field(default_factory=list)
    audited_since_publish: list[int] = field(default_factory=list)
    audited_agree_since_publish: list[int] = field(default_factory=list)
    macs: int = 0  # serving MACs actually spent (audited samples at full cost)
    macs_since_publish: int = 0
    train_steps: int = 0
    trained_samples: int = 0  # samples stored for training (drives the training credit)
    calibrations: int = 0
    last_calibration: int = 0
    drift_alarms: int = 0
    serve_seconds: float = 0.0  # wall-clock of serving passes (the time budget's reference)
    learn_seconds: float = 0.0  # wall-clock of learning: bookkeeping, training, calibrations
    epoch: int = 0  # bumped by a drift alarm: older evidence and candidates are void

    def reset_publish(self, num_exits: int) -> None:
        self.exits_since_publish = [0] * (num_exits + 1)
        self.samples_since_publish = 0
        self.audited_since_publish = [0] * num_exits
        self.audited_agree_since_publish = [0] * num_exits
        self.macs_since_publish = 0


class OnlineDistiller:
    """Serve live traffic with an :class:`EarlyExitModel` and learn its exit heads from it.

    No labels and no training set: the teacher is the model's own final output on the traffic it
    serves. Gates stay closed until held-out, content-independent evidence shows (Learn-then-Test)
    that each head agrees with the full model on the samples it would let out, at
    ``config.target_agreement`` with ``config.confidence``.

    Args:
        eem: the wrapped model (from :func:`earlyexit.wrap`); its heads are replaced by trained
            copies when gates are recalibrated, its base model is never changed.
        config: a :class:`DistillConfig` (defaults: target 0.99 at 95% confidence, 5% audit).

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
        # The student: a shadow copy only the trainer touches; served heads are copies of it.
        self._student = copy.deepcopy(eem.heads)
        self._student.train()
        for p in self._student.parameters():
            p.requires_grad_(True)
        self._optimizer = torch.optim.AdamW(
            self._student.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self._audit_rng = torch.Generator().manual_seed(config.seed)
        self._train_rng = torch.Generator().manual_seed(config.seed + 1)
        self._hash_proj = torch.randn(
            3 * _HASH_SIDE * _HASH_SIDE,
            generator=torch.Generator().manual_seed(config.seed + 2),
            dtype=torch.float64,
        )
        self._replay: TensorRing | None = None  # built at the first sample (z shapes known then)
        self._evidence: TensorRing | None = None
        # Learned gate: per-exit features and agreement of training-side samples, computed by the
        # student *before* it trains on them (so they show how it does on traffic it has not seen).
        self._gate_data: TensorRing | None = None
        self._pending: list[tuple[list[Tensor], Tensor]] = []
        self._pending_rows = 0
        self._counters = _Counters(
            exits=[0] * (num_exits + 1),
            audited=[0] * num_exits,
            audited_agree=[0] * num_exits,
        )
        self._counters.reset_publish(num_exits)
        self._credit = 0.0  # optimizer steps owed to the traffic seen
        self._step_seconds = 0.0  # running mean of one training step's wall-clock
        # (samples, per-path counts, MACs) of the latest batches: recent exit rates and saving.
        self._recent: deque[tuple[int, list[int], int]] = deque()
        self._recent_samples = 0
        self._monitor: list[deque[bool]] = [
            deque(maxlen=config.drift_window) for _ in range(num_exits)
        ]
        self._reports: list[dict[str, Any]] = [
            {"state": "closed", "reason": "warm-up: no calibration yet"} for _ in range(num_exits)
        ]
        self._expected_saving = 0.0
        self._phase = "warm-up"
        self._last_loss: float | None = None
        self._collect_evidence = True
        # _lock guards buffers, counters and the candidate slot; _train_lock the student and the
        # optimizer (held by the trainer for each step, by save() to get a consistent snapshot).
        self._lock = threading.RLock()
        self._train_lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._calibration_due = False
        self._ready: _Candidate | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if config.background:
            self._start_thread()

    # ------------------------------------------------------------------ serving and learning
    def step(self, x: Tensor) -> ExitResult:
        """Serve a batch of live traffic and learn from it; returns the served :class:`ExitResult`.

        A bad batch (wrong shape, dtype or device, NaN/Inf, empty) raises
        :class:`~earlyexit.InputError` before any state of the learner changes. In background mode
        a failure of the trainer thread is raised here as :class:`BackgroundTrainingError`.

        Example:
            >>> res = learner.step(torch.randn(32, 3, 224, 224))  # doctest: +SKIP
            >>> res.exit_index  # doctest: +SKIP
        """
        step_started = time.perf_counter()
        self._raise_background_error()
        self._validate(x)
        self._install_ready()
        thresholds = self.eem.thresholds
        calibration_side = self._split_is_calibration(x)
        with self._lock:
            rng_state = self._audit_rng.get_state()
            if all(t == math.inf for t in thresholds):
                # Everything runs to the end anyway: every sample is evidence or teaches.
                audit = torch.ones(x.shape[0], dtype=torch.bool)
            else:
                # Audit only held-out contents, at the rate that audits ``audit_rate`` of all
                # traffic: every audited sample is then evidence (auditing a sample whose content
                # may only teach would pay the full model for nothing the calibration can use).
                rate = min(1.0, self._audit_share() / self.config.calibration_fraction)
                coin = torch.rand(x.shape[0], generator=self._audit_rng) < rate
                audit = coin & calibration_side
        audit, calibration_side = audit.to(x.device), calibration_side.to(x.device)
        started = time.perf_counter()
        try:
            result, trace = self.eem._serve(x, capture=True, audit=audit, checked=True)
        except BaseException:
            with self._lock:
                self._audit_rng.set_state(rng_state)  # a failed call leaves no trace
            raise
        served = time.perf_counter() - started
        self._learn(x, result, trace, audit, calibration_side)
        with self._lock:
            c = self._counters
            c.serve_seconds += served
            # Per-batch bookkeeping (checks, hashing, buffers) is learning work too: it counts
            # against the same budget as training, so the budget bounds the whole overhead.
            c.learn_seconds += time.perf_counter() - step_started - served
        self._after_batch()
        return result

    def _audit_share(self) -> float:
        """Share of traffic audited now: ``audit_rate``, raised towards ``audit_boost`` while the
        held-out evidence is short of ``evidence_target`` (the bound that decides how far gates
        may open tightens with every evidence sample; once there is enough, audits cost more than
        they teach). Call under ``_lock``."""
        cfg = self.config
        have, target = 0, cfg.evidence_target
        if self._evidence is not None:  # a memory cap may hold fewer than the target
            have, target = len(self._evidence), min(target, self._evidence.capacity)
        shortfall = max(0.0, 1.0 - have / target) if target else 0.0
        return cfg.audit_rate + max(0.0, cfg.audit_boost - cfg.audit_rate) * shortfall

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
        self._raise_background_error()
        with self._train_lock:
            self._timed(self._flush_pending)
            candidate = self._timed(self._make_candidate)
        self._publish(candidate)
        return self.stats()

    def sync(self, timeout: float | None = None) -> None:
        """Background mode: wait until the trainer has caught up with the traffic seen, and
        install its latest calibrated heads. A no-op in synchronous mode."""
        if self._thread is None:
            return
        with self._wake:
            self._wake.notify_all()
            self._wake.wait_for(
                lambda: (
                    self._error is not None
                    or (
                        not self._may_train()
                        and not self._calibration_due
                        and not self._flush_due(False)
                    )
                ),
                timeout=timeout,
            )
        self._raise_background_error()
        self._install_ready()

    def close(self) -> None:
        """Stop the background trainer (if any). The learner can still serve synchronously."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        thread.join()
        self._thread = None

    def __enter__(self) -> OnlineDistiller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals: one batch
    def _validate(self, x: object) -> None:
        self.eem._check_input(x)  # shape, dtype, device, NaN/Inf: clear InputErrors
        assert isinstance(x, Tensor)
        if x.shape[0] == 0:
            raise InputError("empty batch: there is nothing to serve or learn from")
        if self.eem.base_model.training:
            raise InputError("the base model is in training mode; call model.eval() before serving")

    def _split_is_calibration(self, x: Tensor) -> Tensor:
        """Seeded hash of each image's content -> True where that content is held out for
        calibration. Content-based so a repeated image always lands on the same side."""
        thumb = F.adaptive_avg_pool2d(x.detach().float(), _HASH_SIDE)
        if thumb.shape[1] != 3:  # fold any channel count onto three hash channels
            thumb = torch.stack([thumb[:, i::3].sum(dim=1) for i in range(3)], dim=1)
        value = thumb.flatten(1).double().cpu() @ self._hash_proj
        u = torch.frac(value.abs() * 7919.0)  # the fine digits of a random projection: ~uniform
        return u < self.config.calibration_fraction

    def _learn(
        self,
        x: Tensor,
        result: ExitResult,
        trace: ExitTrace,
        audit: Tensor,
        calibration_side: Tensor,
    ) -> None:
        num_exits = self.eem.num_exits
        batch = x.shape[0]
        exit_index = result.exit_index.cpu()
        path = self.eem.path_macs()
        final_rows = trace.final_rows
        with self._lock:
            c = self._counters
            counts = torch.bincount(exit_index, minlength=num_exits + 1).tolist()
            for i, n in enumerate(counts):
                c.exits[i] += n
                c.exits_since_publish[i] += n
            # MACs of the path each sample took; an audited early exit also ran to the end.
            audited_full = audit.cpu() & (exit_index < num_exits)
            taken = torch.where(audited_full, num_exits, exit_index)
            spent = int(torch.tensor(path, dtype=torch.long)[taken].sum())
            c.samples += batch
            c.samples_since_publish += batch
            c.macs += spent
            c.macs_since_publish += spent
            self._recent.append((batch, counts, spent))
            self._recent_samples += batch
            while self._recent_samples - self._recent[0][0] >= _STATS_WINDOW:
                self._recent_samples -= self._recent.popleft()[0]
            if final_rows.numel() == 0 or trace.final_logits is None:
                return
            teacher = trace.final_logits.detach()
            position = torch.full((batch,), -1, dtype=torch.long, device=final_rows.device)
            position[final_rows] = torch.arange(final_rows.numel(), device=final_rows.device)
            # Agreement of audited early answers with the full model: the drift monitor's input.
            audited_rows = torch.nonzero(audited_full.to(final_rows.device)).flatten()
            if audited_rows.numel():
                early = result.logits[audited_rows].argmax(dim=-1)
                full = teacher[position[audited_rows]].argmax(dim=-1)
                agree = (early == full).cpu()
                where = exit_index[audited_rows.cpu()]
                for e, ok in zip(where.tolist(), agree.tolist(), strict=True):
                    c.audited[e] += 1
                    c.audited_since_publish[e] += 1
                    c.audited_agree[e] += ok
                    c.audited_agree_since_publish[e] += ok
                    self._monitor[e].append(bool(ok))
            # Features of every exit for the samples that ran to the end.
            zs = []
            for record in trace.exits:
                if record is None:  # cannot happen with trace(); guard for custom models
                    return
                pos = torch.full((batch,), -1, dtype=torch.long, device=record.rows.device)
                pos[record.rows] = torch.arange(record.rows.numel(), device=record.rows.device)
                zs.append(record.z[pos[final_rows]].detach())
            self._ensure_buffers(zs, teacher)
            held_out = calibration_side[final_rows]
            evidence = audit[final_rows] & held_out
            train = ~held_out
            assert self._replay is not None and self._evidence is not None
            if self._collect_evidence and bool(evidence.any()):
                self._evidence.add(
                    **{f"z{i}": z[evidence] for i, z in enumerate(zs)},
                    teacher=teacher[evidence].argmax(dim=-1),
                )
            if bool(train.any()):
                rows = ([z[train] for z in zs], teacher[train])
                if self.config.gate == "learned" and self._collect_evidence:
                    # Held back from replay until the student's view of them is recorded.
                    self._pending.append(rows)
                    self._pending_rows += rows[1].shape[0]
                else:
                    self._add_to_replay(*rows)
            if audited_rows.numel():
                self._check_drift()

    def _add_to_replay(self, zs: list[Tensor], teacher: Tensor) -> None:
        """Store training rows and owe the optimizer steps they pay for (call under _lock)."""
        assert self._replay is not None
        n = teacher.shape[0]
        self._replay.add(**{f"z{i}": z for i, z in enumerate(zs)}, teacher=teacher)
        self._counters.trained_samples += n
        owed = self._credit + n * self.config.replay_ratio / self.config.batch_size
        # A trainer that falls behind skips steps rather than lagging ever further.
        self._credit = min(owed, _MAX_OWED_STEPS)

    def _flush_due(self, calibrating: bool) -> bool:
        # Early on every row matters to heads that know nothing yet: flush every batch, then in
        # blocks that grow with what replay already holds.
        block = min(_PENDING_FLUSH, self._counters.trained_samples // 2)
        return bool(self._pending) and (calibrating or self._pending_rows >= block)

    def _after_batch(self) -> None:
        """Schedule training and calibration (inline, or hand them to the background thread)."""
        with self._wake:  # the lock behind _wake guards the counters and the schedule
            c = self._counters
            cfg = self.config
            due = c.samples >= cfg.warmup_samples and (
                c.samples - c.last_calibration >= cfg.recalibrate_every
            )
            if due:
                c.last_calibration = c.samples
            if self._thread is not None:
                if due:
                    self._calibration_due = True
                self._wake.notify_all()
                return
        if self._flush_due(due):
            self._timed(self._flush_pending)
        if self._may_train():
            # One intra-op thread: head training is many tiny ops, which the thread pool only
            # slows down (far more on a shared machine). Serving keeps its threads.
            with fixed_threads(1):
                while self._may_train():
                    self._credit -= 1.0
                    self._train_step()
        if due:
            self._publish(self._timed(self._make_candidate))

    def _may_train(self) -> bool:
        """A step is owed (replay ratio) and affordable (time budget vs serving wall-clock)."""
        if self._credit < 1.0:
            return False
        budget = self.config.train_time_budget
        c = self._counters
        # Only a step that fits in what is left: the budget is not overshot by a step per batch.
        return budget is None or c.learn_seconds + self._step_seconds <= budget * c.serve_seconds

    def _timed(self, fn):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            return fn()
        finally:
            with self._lock:
                self._counters.learn_seconds += time.perf_counter() - started

    # ------------------------------------------------------------------ internals: training
    def _ensure_buffers(self, zs: list[Tensor], teacher: Tensor) -> None:
        if self._replay is not None:
            return
        cfg = self.config
        dtype = _DTYPES[cfg.storage_dtype]
        itemsize = torch.tensor([], dtype=dtype).element_size()
        z_bytes = sum(z[0].numel() for z in zs) * itemsize
        num_exits, width = len(zs), len(AGREEMENT_FEATURES)
        learned_gate = cfg.gate == "learned"
        rows = {
            "replay": (cfg.replay_samples, z_bytes + teacher.shape[1] * 4),
            "evidence": (cfg.evidence_samples, z_bytes + 8),
            "gate": (cfg.gate_samples if learned_gate else 0, num_exits * (width * 4 + 1)),
        }
        caps = {name: cap for name, (cap, _) in rows.items()}
        if cfg.max_memory_bytes is not None:
            total = sum(cap * size for cap, size in rows.values())
            if total > cfg.max_memory_bytes:  # shrink all, keeping their proportion
                scale = cfg.max_memory_bytes / total
                caps = {name: max(1, int(cap * scale)) if cap else 0 for name, cap in caps.items()}
        device = teacher.device
        z_fields = {f"z{i}": (tuple(z.shape[1:]), dtype) for i, z in enumerate(zs)}
        self._replay = TensorRing(
            caps["replay"], {**z_fields, "teacher": ((teacher.shape[1],), torch.float32)}, device
        )
        self._evidence = TensorRing(
            caps["evidence"], {**z_fields, "teacher": ((), torch.long)}, device
        )
        if learned_gate:
            self._gate_data = TensorRing(
                caps["gate"],
                {
                    "features": ((num_exits, width), torch.float32),
                    "agree": ((num_exits,), torch.bool),
                },
                device,
            )

    def _current_lr(self) -> float:
        half_life = self.config.lr_half_life
        if half_life <= 0:
            return self.config.lr
        return self.config.lr * 0.5 ** (self._counters.trained_samples / half_life)

    def _train_step(self) -> None:
        """One AdamW step of every head on a replay minibatch (stored z, never the backbone)."""
        started = time.perf_counter()
        self._timed(self._train_step_untimed)
        took = time.perf_counter() - started
        with self._lock:  # a running mean of what a step costs, for the budget check
            self._step_seconds = (
                took if self._step_seconds == 0.0 else 0.9 * self._step_seconds + 0.1 * took
            )

    def _train_step_untimed(self) -> None:
        with self._lock:
            replay = self._replay
            if replay is None or len(replay) == 0:
                return
            batch = replay.sample(min(self.config.batch_size, len(replay)), self._train_rng)
        with self._train_lock:
            lr = self._current_lr()
            for group in self._optimizer.param_groups:
                group["lr"] = lr
            teacher = batch["teacher"]
            loss = torch.zeros((), device=teacher.device)
            with torch.enable_grad():
                for i, head in enumerate(self._student):
                    z = batch[f"z{i}"].float()
                    loss = loss + distillation_loss(
                        head.classify(z),
                        teacher,
                        self.config.temperature,
                        self.config.hard_label_weight,
                    )
                self._optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self._optimizer.step()
            with self._lock:
                self._counters.train_steps += 1
                self._last_loss = float(loss.detach()) / max(len(self._student), 1)

    # ------------------------------------------------------------------ internals: the gate
    def _flush_pending(self) -> None:
        """Record how the student sees the training rows held back since the last flush (it has
        never trained on them: the learned gate's training data), then let them into replay.
        Done in blocks of a few hundred rows: one pass per block, not a dozen tiny ones."""
        with self._lock:
            pending, self._pending, self._pending_rows = self._pending, [], 0
        if not pending:
            return
        zs = [torch.cat([chunk[0][i] for chunk in pending]) for i in range(len(pending[0][0]))]
        teacher = torch.cat([chunk[1] for chunk in pending])
        target = teacher.argmax(dim=-1)
        with self._train_lock:
            logits = _classify_all(self._student, zs)
        with torch.no_grad():
            feats = [agreement_features(out, logits[:i]) for i, out in enumerate(logits)]
        with self._lock:
            if self._gate_data is not None:  # built with the other buffers
                self._gate_data.add(
                    features=torch.stack(feats, 1), agree=_agreement(logits, target)
                )
            self._add_to_replay(zs, teacher)

    def _fit_gate(self) -> tuple[Gate, str]:
        """The gate to calibrate and serve with the next heads, and a word on how it was chosen."""
        if self.config.gate == "wrap":
            return self.eem.gate, "the gate given to ee.wrap"
        with self._lock:
            data = (
                {k: v.clone() for k, v in self._gate_data.view().items()}
                if self._gate_data is not None
                else None
            )
        if data is None or data["agree"].shape[0] < _MIN_GATE_SAMPLES:
            have = 0 if data is None else data["agree"].shape[0]
            return LearnedGate(), (
                f"learned gate not fitted yet ({have}/{_MIN_GATE_SAMPLES} samples): max softmax"
            )
        try:
            gate = fit_learned_gate(data["features"], data["agree"], min_samples=_MIN_GATE_SAMPLES)
        except ConfigError as err:  # e.g. non-finite features: serve on, with the plain rule
            return LearnedGate(), f"learned gate not fitted ({err}): max softmax"
        return gate, f"learned gate fitted on {data['agree'].shape[0]} training-side samples"

    # ------------------------------------------------------------------ internals: calibration
    def _score_evidence(
        self, heads: nn.ModuleList, gate: Gate, data: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Gate scores ``[N, E]`` and agreement ``[N, E]`` of ``heads`` on stored evidence."""
        teacher = data["teacher"]
        rows = torch.arange(teacher.shape[0], device=teacher.device)
        logits = _classify_all(heads, [data[f"z{i}"] for i in range(len(heads))])
        with torch.no_grad():
            scores = [
                gate.score(out, GateContext(i, rows, logits[:i])).float().cpu()
                for i, out in enumerate(logits)
            ]
        return torch.stack(scores, dim=1), _agreement(logits, teacher).cpu()

    def _expected_cost(self, scores: Tensor, thresholds: Sequence[float], gate: Gate) -> float:
        where = simulate_exits(scores, list(thresholds))
        path = torch.tensor(self.eem.path_macs(tuple(thresholds), gate=gate), dtype=torch.float64)
        return float(path[where].mean()) if where.numel() else float(path[-1])

    def _make_candidate(self) -> _Candidate:
        """Copy the student, choose which exits pay on a quarter of the held-out evidence, then
        calibrate the copy's thresholds on the rest."""
        cfg = self.config
        num_exits = self.eem.num_exits
        # Too little evidence for even the most lenient test: nothing can open, so skip the work
        # (warm-up recalibrates several times before the first gate can open).
        need = min_evidence(cfg.target_agreement, 1.0 - cfg.confidence, TOLERATED_FAILURES)
        with self._lock:
            epoch = self._counters.epoch
            have = len(self._evidence) if self._evidence is not None else 0
            if have < need:
                reason = f"closed: {have} evidence samples, {need} needed"
                reports = [{"state": "closed", "reason": reason} for _ in range(num_exits)]
                return _Candidate(
                    self.eem.heads, self.eem.gate, (math.inf,) * num_exits, reports, 0.0, 0, epoch
                )
            data = {k: v.clone() for k, v in self._evidence.view().items()}
        heads = copy.deepcopy(self._student)
        heads.train(self.eem.training)
        gate, gate_note = self._fit_gate()
        scores, agree = self._score_evidence(heads, gate, data)
        # Exits are chosen on every _SELECT_EVERY-th evidence row and the rest tests the thresholds
        # once: testing several exit sets on the same rows and serving the cheapest would spend
        # the confidence level once per set. The split depends only on row positions and counts.
        enabled, switched = [True] * num_exits, {}
        rows = torch.arange(scores.shape[0])
        choose = rows % _SELECT_EVERY == 0
        if cfg.auto_switch_off and int((~choose).sum()) >= need:
            enabled, switched = self._select_exits(scores[choose], agree[choose], gate)
            scores, agree = scores[~choose], agree[~choose]
        result = self._calibrate(scores, agree, enabled)
        cost = self._expected_cost(scores, result.thresholds, gate)
        base = float(self.eem.base_macs)
        where = simulate_exits(scores, list(result.thresholds))
        n = max(int(where.numel()), 1)
        reports = []
        for e, detail in enumerate(result.exits):
            report = {
                "state": "open" if detail.threshold < math.inf else "closed",
                "reason": switched.get(e, detail.reason),
                "evidence_reached": detail.reached,
                "evidence_exiting": detail.exiting,
                "evidence_agreement": detail.agreement,
                "evidence_lower_bound": detail.lower_bound,
                "expected_exit_rate": float((where == e).sum()) / n,
                "gate": gate_note,
            }
            if e in switched:
                report["state"] = "switched off"
            reports.append(report)
        saving = 1.0 - cost / base
        return _Candidate(
            heads, gate, result.thresholds, reports, saving, int(scores.shape[0]), epoch
        )

    def _calibrate(self, scores: Tensor, agree: Tensor, enabled: list[bool]) -> CalibrationResult:
        cfg = self.config
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

    def _select_exits(
        self, scores: Tensor, agree: Tensor, gate: Gate
    ) -> tuple[list[bool], dict[int, str]]:
        """Automatic exit selection: which exits pay for their heads, and why the others do not.

        Greedy on the evidence rows set aside for choosing (never those tested next): put every
        exit still on at the most lenient shared threshold whose agreement on these rows meets the
        target, drop the open exit whose removal saves the most MACs (or that saves nothing),
        repeat. A point estimate suffices here: the guarantee comes from the test that follows.
        """
        num_exits = self.eem.num_exits
        enabled = [True] * num_exits
        switched: dict[int, str] = {}
        target = self.config.target_agreement

        def cost_of(trial: list[bool]) -> tuple[tuple[float, ...], float]:
            thresholds = empirical_joint_thresholds(scores, agree, target, enabled=trial)
            return thresholds, self._expected_cost(scores, thresholds, gate)

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
                else f"switched off: without it the path costs {cost - cost_e:.0f} MACs/sample "
                f"less on held-out evidence; it saves {(cost_e - cost) / base:+.4f} of the base "
                f"model net (its head costs {self.eem.head_macs[e]} MACs on every sample "
                "reaching it)"
            )
            enabled[e] = False
            thresholds, cost = thresholds_e, cost_e

    def _publish(self, candidate: _Candidate) -> None:
        """Serve ``candidate``: its heads and its thresholds, never one without the other."""
        with self._lock:
            if candidate.epoch != self._counters.epoch:
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
            self._counters.calibrations += 1
            self._counters.reset_publish(eem.num_exits)
            opened = any(t < math.inf for t in candidate.thresholds)
            if opened:
                self._phase = "serving"
            elif self._phase == "serving":
                self._phase = "closed: evidence no longer supports any gate"

    def _install_ready(self) -> None:
        with self._lock:
            candidate, self._ready = self._ready, None
        if candidate is not None:
            self._publish(candidate)

    def _check_drift(self) -> None:
        """Close every gate when an exit's audited agreement is provably below the target."""
        cfg = self.config
        eps = 1.0 - cfg.target_agreement
        windows: list[tuple[int, Iterable[bool]]] = list(enumerate(self._monitor))
        if cfg.calibration_mode == "joint":  # the guarantee is pooled: so is the alarm
            windows = [(-1, [ok for window in self._monitor for ok in window])]
        for e, window in windows:
            window = list(window)
            n = len(window)
            if n == 0:
                continue
            failures = n - sum(window)
            if failures == 0:
                continue
            # P(at least this many failures | agreement exactly at target): small = drifted.
            p = float(scipy_stats.binom.sf(failures - 1, n, eps))
            if p < cfg.drift_alpha:
                self._raise_drift_alarm(e, n, failures)
                return

    def _raise_drift_alarm(self, exit_: int, n: int, failures: int) -> None:
        c = self._counters
        c.drift_alarms += 1
        c.epoch += 1
        self.eem.set_thresholds([math.inf] * self.eem.num_exits)
        if self._evidence is not None:
            self._evidence.clear()
        if self.config.forget_on_drift and self._replay is not None:
            self._replay.clear()
            self._credit = 0.0
            if self._gate_data is not None:  # how confidence maps to agreement may have moved too
                self._gate_data.clear()
            self._pending, self._pending_rows = [], 0
        for window in self._monitor:
            window.clear()
        self._ready = None
        c.last_calibration = c.samples  # gather a fresh round of evidence before reopening
        c.reset_publish(self.eem.num_exits)
        where = "early exits (pooled)" if exit_ < 0 else f"exit {exit_}"
        self._phase = (
            f"drift: {where} agreed on {n - failures}/{n} audited samples, below "
            f"{self.config.target_agreement}; all gates closed until new evidence supports them"
        )
        for report in self._reports:
            report.update(state="closed", reason="closed by the drift monitor")

    # ------------------------------------------------------------------ background mode
    def _start_thread(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._trainer_loop, name="earlyexit-distill", daemon=True
        )
        self._thread.start()

    def _trainer_loop(self) -> None:
        try:
            while True:
                with self._wake:
                    self._wake.wait_for(
                        lambda: (
                            self._stop.is_set()
                            or self._may_train()
                            or self._calibration_due
                            or self._flush_due(False)
                        )
                    )
                    if self._stop.is_set():
                        return
                    calibrate = self._calibration_due
                    train = self._may_train()
                    if train:
                        self._credit -= 1.0
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
                with self._wake:
                    self._wake.notify_all()
        except BaseException as err:  # surfaced by the next step(), never swallowed
            with self._wake:
                self._error = err
                self._wake.notify_all()

    def _raise_background_error(self) -> None:
        err = self._error
        if err is not None:
            raise BackgroundTrainingError(
                f"the background trainer failed ({type(err).__name__}: {err}); the served heads "
                "are the last ones published. Fix the cause and start a new OnlineDistiller (or "
                "OnlineDistiller.load a saved state)."
            ) from err

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        """What the learner has seen and decided (JSON-serialisable).

        Keys: ``samples``, ``phase``, ``exit_rates`` (per exit, over the last ~2048 samples
        served), ``audited_agreement`` and ``audited_lower_bound`` (per exit: share of the latest
        ``drift_window`` audited early answers that agree with the full model, and its one-sided
        lower bound at ``confidence``), ``thresholds``, ``mac_saving`` (1 - MACs actually spent on
        the last ~2048 samples, audits included, over the base model's), ``expected_mac_saving``
        (the current policy on held-out evidence), ``exits`` (per exit: state, the reason for it,
        the numbers above), and buffer/training counters.

        Example:
            >>> learner.stats()["mac_saving"]  # doctest: +SKIP
            0.41
        """
        with self._lock:
            c = self._counters
            cfg = self.config
            eem = self.eem
            num_exits = eem.num_exits
            base = eem.base_macs
            recent = max(self._recent_samples, 1)
            exit_rates = [
                sum(counts[e] for _, counts, _ in self._recent) / recent for e in range(num_exits)
            ]
            recent_macs = sum(m for _, _, m in self._recent)
            agreement = []
            for e in range(num_exits):
                window = self._monitor[e]
                n, ok = len(window), sum(window)
                n_all, ok_all = c.audited[e], c.audited_agree[e]
                agreement.append(
                    {
                        "audited": n,
                        "agreement": ok / n if n else None,
                        "lower_bound": clopper_pearson_lower(ok, n, cfg.confidence) if n else None,
                        "audited_total": n_all,
                        "agreement_total": ok_all / n_all if n_all else None,
                    }
                )
            thresholds = list(eem.thresholds)
            exits = []
            for e, point in enumerate(eem.exits):
                exits.append(
                    {
                        "name": point.name,
                        "threshold": thresholds[e],
                        "exit_rate": exit_rates[e],
                        "head_macs": eem.head_macs[e],
                        **agreement[e],
                        **self._reports[e],
                    }
                )
            rings = (self._replay, self._evidence, self._gate_data)
            memory = sum(r.nbytes for r in rings if r is not None)
            return {
                "samples": c.samples,
                "phase": self._phase,
                "exit_rates": exit_rates,
                "exit_rates_total": [c.exits[e] / max(c.samples, 1) for e in range(num_exits)],
                "audited_agreement": [a["agreement"] for a in agreement],
                "audited_lower_bound": [a["lower_bound"] for a in agreement],
                "thresholds": thresholds,
                "gate": repr(eem.gate),
                "mac_saving": 1.0 - recent_macs / (recent * base) if self._recent_samples else 0.0,
                "mac_saving_total": 1.0 - c.macs / (c.samples * base) if c.samples else 0.0,
                "expected_mac_saving": self._expected_saving,
                "target_agreement": cfg.target_agreement,
                "confidence": cfg.confidence,
                "exits": exits,
                "evidence": len(self._evidence) if self._evidence is not None else 0,
                "replay": len(self._replay) if self._replay is not None else 0,
                "memory_bytes": memory,
                "train_steps": c.train_steps,
                "loss": self._last_loss,
                "calibrations": c.calibrations,
                "drift_alarms": c.drift_alarms,
            }

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the model (heads, thresholds, fingerprint) and everything needed to resume learning
        (student heads, optimizer, buffers, counters, random states) to one file, atomically.

        ``ee.load(model, path)`` reads the same file as a plain :class:`EarlyExitModel`.

        Example:
            >>> learner.save("learner.safetensors")  # doctest: +SKIP
            >>> learner = OnlineDistiller.load(model, "learner.safetensors")  # doctest: +SKIP
        """
        with self._train_lock, self._lock:
            tensors, extra = self._state()
            save_early_exit_model(self.eem, path, extra_tensors=tensors, extra_config=extra)

    @classmethod
    def load(
        cls,
        model: nn.Module | EarlyExitModel,
        path: str | Path,
        *,
        background: bool | None = None,
    ) -> OnlineDistiller:
        """Resume a learner saved with :meth:`save`, on the base model (or an ``EarlyExitModel`` of
        it) it was trained on.

        Args:
            model: the base classifier, or an :class:`EarlyExitModel` wrapping it with the same
                exits (its heads and thresholds are overwritten with the saved ones).
            path: the file :meth:`save` wrote.
            background: override ``config.background``.

        Example:
            >>> learner = OnlineDistiller.load(model, "learner.safetensors")  # doctest: +SKIP
        """
        tensors, config = read_checkpoint(path)
        state = (config.get("extra") or {}).get("distill")
        if state is None:
            raise CheckpointError(
                f"{str(path)!r} holds an EarlyExitModel but no learner state (written by eem.save?): "
                "use eem = ee.load(model, path) and start OnlineDistiller(eem, config)"
            )
        if state.get("version", 0) > STATE_VERSION:
            raise CheckpointError(
                f"{str(path)!r} holds learner state v{state.get('version')}; this earlyexit reads "
                f"up to v{STATE_VERSION} (upgrade earlyexit?)"
            )
        if isinstance(model, EarlyExitModel):
            eem = model
            saved = config.get("base_model", {})
            if saved != fingerprint(eem.base_model):
                raise CheckpointError(
                    f"{str(path)!r} was saved for a different base model (architecture or weights "
                    "differ): resume on the model it was trained with"
                )
            if [e.name for e in eem.exits] != list(config.get("exits", [])):
                raise CheckpointError(
                    f"{str(path)!r} has exits {config.get('exits')}, this model "
                    f"{[e.name for e in eem.exits]}: wrap with exits={config.get('exits')}"
                )
            heads = {k[len("heads.") :]: v for k, v in tensors.items() if k.startswith("heads.")}
            try:
                eem.heads.load_state_dict(heads, strict=True)
            except RuntimeError as err:
                raise CheckpointError(f"{str(path)!r} heads do not fit this model: {err}") from err
            eem.gate = make_gate(config["gate"])
            eem.set_thresholds(tensors["thresholds"].tolist())
        elif isinstance(model, nn.Module):
            eem = restore(model, tensors, config, path=str(path))
        else:
            raise ConfigError(f"expected a model or an EarlyExitModel, got {type(model).__name__}")
        cfg_dict = dict(state["config"])
        if background is not None:
            cfg_dict["background"] = bool(background)
        wants_background = cfg_dict["background"]
        cfg_dict["background"] = False  # start the thread only once the state is in place
        learner = cls(eem, DistillConfig.from_dict(cfg_dict))
        extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
        try:
            learner._load_state(extra, state)
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{str(path)!r} learner state is incomplete: {err}") from err
        learner.config = DistillConfig.from_dict({**cfg_dict, "background": wants_background})
        if wants_background:
            learner._start_thread()
        return learner

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and JSON config that capture the learner exactly (used by save and tests)."""
        tensors: dict[str, Tensor] = {}
        for k, v in self._student.state_dict().items():
            tensors[f"student.{k}"] = v.detach().clone()
        opt = self._optimizer.state_dict()
        for pid, pstate in opt["state"].items():
            for key, value in pstate.items():
                tensors[f"opt.{pid}.{key}"] = torch.as_tensor(value).clone()
        tensors["rng.audit"] = self._audit_rng.get_state()
        tensors["rng.train"] = self._train_rng.get_state()
        rings: dict[str, Any] = {}
        rings_to_save = (
            ("replay", self._replay),
            ("evidence", self._evidence),
            ("gate_data", self._gate_data),
        )
        for name, ring in rings_to_save:
            if ring is None:
                continue
            for field_name, value in ring.state().items():
                tensors[f"{name}.{field_name}"] = value
            rings[name] = {
                "capacity": ring.capacity,
                "head": ring.head,
                "added": ring.added,
                "fields": {
                    k: [list(s), str(d).removeprefix("torch.")] for k, (s, d) in ring.fields.items()
                },
            }
        for e, window in enumerate(self._monitor):
            tensors[f"monitor.{e}"] = torch.tensor(list(window), dtype=torch.bool)
        if self._pending:
            for i in range(len(self._pending[0][0])):
                tensors[f"pending.z{i}"] = torch.cat([chunk[0][i] for chunk in self._pending])
            tensors["pending.teacher"] = torch.cat([chunk[1] for chunk in self._pending])
        c = self._counters
        extra = {
            "distill": {
                "version": STATE_VERSION,
                "config": self.config.to_dict(),
                "counters": dict(vars(c)),
                "credit": self._credit,
                "param_groups": [
                    {k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]
                ],
                "rings": rings,
                "reports": self._reports,
                "expected_mac_saving": self._expected_saving,
                "phase": self._phase,
                "last_loss": self._last_loss,
            }
        }
        return tensors, extra

    def _load_state(self, tensors: dict[str, Tensor], extra: dict[str, Any]) -> None:
        student = {k[len("student.") :]: v for k, v in tensors.items() if k.startswith("student.")}
        self._student.load_state_dict(student, strict=True)
        opt = self._optimizer.state_dict()
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value.clone()
        groups = []
        for saved, current in zip(extra["param_groups"], opt["param_groups"], strict=True):
            # JSON turned tuples (AdamW's betas) into lists: give them their type back.
            restored = {
                k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()
            }
            groups.append({**restored, "params": current["params"]})
        self._optimizer.load_state_dict({"state": state, "param_groups": groups})
        self._audit_rng.set_state(tensors["rng.audit"])
        self._train_rng.set_state(tensors["rng.train"])
        for name, meta in extra["rings"].items():
            fields = {
                k: (tuple(shape), getattr(torch, dtype))
                for k, (shape, dtype) in meta["fields"].items()
            }
            device = next(self._student.parameters(), torch.zeros(())).device
            ring = TensorRing(meta["capacity"], fields, device)
            ring.load({k: tensors[f"{name}.{k}"] for k in fields}, meta["head"], meta["added"])
            setattr(self, f"_{name}", ring)
        for e, window in enumerate(self._monitor):
            window.extend(tensors[f"monitor.{e}"].tolist())
        if "pending.teacher" in tensors:
            zs = [tensors[f"pending.z{i}"] for i in range(len(self._monitor))]
            self._pending = [(zs, tensors["pending.teacher"])]
            self._pending_rows = int(tensors["pending.teacher"].shape[0])
        self._counters = _Counters(**extra["counters"])
        self._credit = float(extra["credit"])
        self._reports = list(extra["reports"])
        self._expected_saving = float(extra["expected_mac_saving"])
        self._phase = str(extra["phase"])
        self._last_loss = extra["last_loss"]
