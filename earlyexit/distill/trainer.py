"""The head trainer: a shadow copy of the exit heads, distilled from the full model's logits.

:class:`HeadTrainer` owns the student (heads only the trainer touches; served heads are copies of
it), its AdamW optimizer, the replay ring of stored features and teacher logits, the random stream
that samples replay minibatches, and the optimizer steps owed to the traffic stored. The backbone
is never run, trained or put in training mode here: heads learn from the pooled input ``z`` stored
when the sample was served.

Precision: the student and its optimizer state are kept in float32 whatever the served model's
dtype (AdamW steps on float16/bfloat16 weights lose small updates, and a CPU float16 model mixes
dtypes with the float32 rows kept in replay); copies handed out to be calibrated and served are
cast back to the served heads' dtype and device, so what is calibrated is exactly what serves.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import (
    FLOAT_DTYPES,
    expect_dict,
    expect_int,
    expect_list,
    expect_number,
    expect_tensor,
    field_error,
)
from ..errors import CheckpointError
from .buffers import (
    TensorRing,
    check_ring_state,
    feature_fields,
    ring_from_state,
    ring_state,
    saved_fields,
)
from .config import DistillConfig

#: Optimizer steps a lagging background trainer may owe before new traffic stops adding more
#: (a synchronous learner takes every step owed after each batch, so it never nears this).
MAX_OWED_STEPS = 4096.0
#: Most rows :func:`classify_all` runs through a head at once (see there).
CLASSIFY_BLOCK = 64


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


def parameter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (float32 when it has none): the
    dtype its input must have.

    Example:
        >>> parameter_dtype(nn.Linear(2, 2).half())
        torch.float16
    """
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def training_precision(module: nn.Module) -> nn.Module:
    """``module`` with its 16-bit floating-point parameters and buffers in float32 (in place;
    float32 and float64 ones are kept as they are).

    Example:
        >>> training_precision(nn.Linear(2, 2).bfloat16()).weight.dtype
        torch.float32
    """
    return module._apply(
        lambda t: t.float() if t.is_floating_point() and t.element_size() < 4 else t
    )


def classify_all(heads: Sequence[nn.Module], zs: Sequence[Tensor]) -> list[Tensor]:
    """Every head's logits on its stored input ``z`` (no backbone pass, no autograd); ``z`` is
    cast to the head's own dtype (stored rows may be float16/float32, heads float32 or half).

    Rows go through in blocks of :data:`CLASSIFY_BLOCK` (the same logits as one call): a
    calibration scores every evidence row, and one call on all of them holds the heads'
    activations for all of them at once (~110 KB a row for conv heads on EfficientNet-Lite0:
    hundreds of MB at a full evidence ring), a little more at every calibration; the allocator
    kept those freed blocks, and behind Ray Serve the learner's resident memory grew without a
    plateau. Small blocks keep that working memory at a few MB, the same every time (and run
    faster: 134 ms instead of 524 ms for 2,500 rows on one thread).

    Example:
        >>> from earlyexit.heads import FeatureLayout, LinearHead
        >>> head = LinearHead(FeatureLayout("nchw"), channels=4, num_classes=3)
        >>> [out.shape for out in classify_all([head], [torch.randn(600, 4)])]
        [torch.Size([600, 3])]
    """
    with torch.no_grad():
        out = []
        for head, z in zip(heads, zs, strict=True):
            dtype = parameter_dtype(head)
            if z.shape[0] <= CLASSIFY_BLOCK:
                out.append(head.classify(z.to(dtype)))
            else:
                blocks = z.split(CLASSIFY_BLOCK)
                out.append(torch.cat([head.classify(block.to(dtype)) for block in blocks]))
        return out


def agreement(logits: Sequence[Tensor], target: Tensor) -> Tensor:
    """``[N, E]`` bool: whether each head's argmax is the full model's answer ``target``."""
    return torch.stack([out.argmax(dim=-1) == target for out in logits], dim=1)


class HeadTrainer:
    """Student heads, optimizer, replay and the steps owed; one AdamW step at a time.

    ``lock`` guards the replay ring and the counts, ``train_lock`` the student and the optimizer
    (the learner shares both with its other parts; a background thread trains while serving goes
    on).

    Example:
        >>> trainer = HeadTrainer(eem.heads, DistillConfig(), lock, train_lock)  # doctest: +SKIP
        >>> trainer.add(zs, teacher_logits)  # stores rows, owes steps  # doctest: +SKIP
        >>> trainer.train_step()  # doctest: +SKIP
    """

    def __init__(
        self,
        heads: nn.ModuleList,
        config: DistillConfig,
        lock: threading.RLock,
        train_lock: threading.RLock,
    ) -> None:
        self.config = config
        self._lock = lock
        self._train_lock = train_lock
        # Float32 master weights (see the module notes); a float32 model's heads are copied as is.
        self.student = training_precision(copy.deepcopy(heads))
        self.student.train()
        for p in self.student.parameters():
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(
            self.student.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.rng = torch.Generator().manual_seed(config.seed + 1)
        self.replay: TensorRing | None = None  # built at the first sample (z shapes known then)
        self.credit = 0.0  # optimizer steps owed to the traffic stored
        self.step_seconds = 0.0  # running mean of one training step's wall-clock
        self.last_loss: float | None = None
        self.train_steps = 0
        self.trained_samples = 0  # samples stored for training (drives the credit and the lr)
        # Exits whose heads no longer train (switched off too long), and each exit's run of
        # calibrations switched off. Replaced whole, never mutated: a step reads one version.
        self.dormant: frozenset[int] = frozenset()
        self.off_streak: list[int] = [0] * len(self.student)

    @property
    def device(self) -> torch.device:
        """Where the student (and so every ring) lives."""
        return next(self.student.parameters(), torch.zeros(())).device

    def build(
        self,
        fields: dict[str, tuple[tuple[int, ...], torch.dtype]],
        num_classes: int,
        capacity: int,
        device: torch.device,
    ) -> None:
        """Allocate the replay ring: features ``z{i}`` of every exit and the teacher's logits."""
        self.replay = TensorRing(
            capacity, {**fields, "teacher": ((num_classes,), torch.float32)}, device
        )

    # ------------------------------------------------------------------ credit and schedule
    def add(
        self,
        zs: list[Tensor],
        teacher: Tensor,
        replay_ratio: float | None = None,
        max_owed: float = MAX_OWED_STEPS,
    ) -> None:
        """Store training rows and owe the optimizer steps they pay for: ``replay_ratio`` (the
        schedule's ratio in force; ``config.replay_ratio`` when not given) replay samples per row,
        ``batch_size`` per step. Owed steps above ``max_owed`` are dropped (a background trainer
        that falls behind skips steps rather than lagging ever further). Call under the lock."""
        assert self.replay is not None, "build() first"
        n = teacher.shape[0]
        self.replay.add(**{f"z{i}": z for i, z in enumerate(zs)}, teacher=teacher)
        self.trained_samples += n
        ratio = self.config.replay_ratio if replay_ratio is None else replay_ratio
        self.credit = min(self.credit + n * ratio / self.config.batch_size, max_owed)

    def may_train(self, learn_seconds: float, allowance_seconds: float) -> bool:
        """A step is owed (replay ratio) and affordable: learning so far plus one more step stays
        within the learning time earned (``allowance_seconds``, see ``train_time_budget``; not
        overshot by a step a batch). Always affordable when ``train_time_budget`` is ``None``."""
        if self.credit < 1.0:
            return False
        budget = self.config.train_time_budget
        return budget is None or learn_seconds + self.step_seconds <= allowance_seconds

    def claim_step(self) -> None:
        """Take one owed step (the caller then runs :meth:`train_step`)."""
        self.credit -= 1.0

    def record_step_seconds(self, took: float) -> None:
        """Update the running mean of a step's wall-clock (the budget check's estimate)."""
        self.step_seconds = (
            took if self.step_seconds == 0.0 else 0.9 * self.step_seconds + 0.1 * took
        )

    def forget(self) -> None:
        """Drop the replay rows and the steps owed (heads then learn only from new traffic)."""
        if self.replay is not None:
            self.replay.clear()
        self.credit = 0.0

    # ------------------------------------------------------------------ dormant heads
    def note_switched_off(self, switched_off: Sequence[bool], after: int) -> None:
        """Count a calibration's exit selection: an exit switched off ``after`` calibrations in
        a row goes dormant (its head stops training); one that is on again wakes. ``after=0``:
        never dormant.

        Example:
            >>> trainer.note_switched_off([True, False], after=1)  # doctest: +SKIP
            >>> trainer.dormant  # doctest: +SKIP
            frozenset({0})
        """
        streak = [n + 1 if off else 0 for n, off in zip(self.off_streak, switched_off, strict=True)]
        self.off_streak = streak
        self.dormant = frozenset(i for i, n in enumerate(streak) if after and n >= after)

    def wake_all(self) -> None:
        """Every head trains again (the traffic moved: what did not pay may pay now)."""
        self.off_streak = [0] * len(self.student)
        self.dormant = frozenset()

    def active_head_macs(self, head_macs: Sequence[int]) -> int:
        """Forward MACs per row of the heads that train (the dormant ones cost nothing)."""
        dormant = self.dormant
        return sum(m for i, m in enumerate(head_macs) if i not in dormant)

    # ------------------------------------------------------------------ training
    def current_lr(self) -> float:
        """``lr``, halved every ``lr_half_life`` samples stored (constant when 0)."""
        half_life = self.config.lr_half_life
        if half_life <= 0:
            return self.config.lr
        return self.config.lr * 0.5 ** (self.trained_samples / half_life)

    def train_step(self) -> int:
        """One AdamW step of every head on a replay minibatch (stored z, never the backbone);
        returns the rows it trained on (0: replay is empty, no step)."""
        with self._lock:
            replay = self.replay
            if replay is None or len(replay) == 0:
                return 0
            rng_state = self.rng.get_state()
            rows = min(self.config.batch_size, len(replay))
            batch = replay.sample(rows, self.rng)
        try:
            self._step_on(batch)
        except BaseException:
            with self._lock:  # a step that failed before updating anything draws nothing
                self.rng.set_state(rng_state)
            raise
        return rows

    def fresh_loss(self, logits: Sequence[Tensor], teacher: Tensor) -> float:
        """Summed distillation loss (mean over heads) of the student's ``logits`` on rows it has
        not trained on: the learning schedule's measure of progress (``Schedule.observe``).

        Example:
            >>> t = torch.randn(4, 10)
            >>> trainer.fresh_loss([t.clone()], t) < 1e-5  # doctest: +SKIP
            True
        """
        cfg = self.config
        with torch.no_grad():
            per_head = [
                distillation_loss(out, teacher, cfg.temperature, cfg.hard_label_weight)
                for out in logits
            ]
        return float(sum(per_head)) / max(len(per_head), 1) * teacher.shape[0]

    def _step_on(self, batch: dict[str, Tensor]) -> None:
        """The loss and backward pass first (what can fail), then the update and the counts."""
        with self._train_lock:
            teacher = batch["teacher"]
            loss = torch.zeros((), device=teacher.device)
            dormant = self.dormant
            if len(dormant) == len(self.student):
                return  # every head dormant: nothing to train (an alarm wakes them)
            with torch.enable_grad():
                for i, head in enumerate(self.student):
                    if i in dormant:
                        continue  # no gradient: AdamW leaves its parameters as they are
                    z = batch[f"z{i}"].to(parameter_dtype(head))
                    loss = loss + distillation_loss(
                        head.classify(z),
                        teacher,
                        self.config.temperature,
                        self.config.hard_label_weight,
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                lr = self.current_lr()
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.step()
            with self._lock:
                self.train_steps += 1
                trained = len(self.student) - len(dormant)
                self.last_loss = float(loss.detach()) / max(trained, 1)

    def classify(self, zs: Sequence[Tensor]) -> list[Tensor]:
        """The student's logits at every exit on stored features (no autograd)."""
        with self._train_lock:
            return classify_all(self.student, zs)

    def copy_student(self, training: bool, like: nn.Module | None = None) -> nn.ModuleList:
        """A frozen-in-time copy of the student, to calibrate and serve (call under the
        train lock, so no step runs halfway through the copy), in the dtype and on the device of
        ``like`` (the served heads: serving feeds them features of that dtype) when given."""
        heads = copy.deepcopy(self.student)
        if like is not None:
            served = next((p for p in like.parameters() if p.is_floating_point()), None)
            if served is not None and (served.dtype, served.device) != (
                parameter_dtype(heads),
                self.device,
            ):
                heads.to(device=served.device, dtype=served.dtype)
        heads.train(training)
        return heads

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Checkpoint tensors (student, optimizer state, random state, replay rows) and JSON
        (credit, optimizer settings, replay description, counts, last loss)."""
        tensors: dict[str, Tensor] = {}
        for k, v in self.student.state_dict().items():
            tensors[f"student.{k}"] = v.detach().clone()
        opt = self.optimizer.state_dict()
        for pid, pstate in opt["state"].items():
            for key, value in pstate.items():
                tensors[f"opt.{pid}.{key}"] = torch.as_tensor(value).clone()
        tensors["rng.train"] = self.rng.get_state()
        rings: dict[str, Any] = {}
        if self.replay is not None:
            ring_tensors, rings["replay"] = ring_state("replay", self.replay)
            tensors.update(ring_tensors)
        state = {
            "counters": {"train_steps": self.train_steps, "trained_samples": self.trained_samples},
            "credit": self.credit,
            "param_groups": [
                {k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]
            ],
            "rings": rings,
            "last_loss": self.last_loss,
            "dormant": sorted(self.dormant),
            "off_streak": list(self.off_streak),
        }
        return tensors, state

    def load_state_dict(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (``state`` may hold other parts' keys too), checked first
        (:func:`check_trainer_state`): a bad state changes nothing."""
        check_trainer_state(tensors, state, self.student, self.config)
        student = {k[len("student.") :]: v for k, v in tensors.items() if k.startswith("student.")}
        self.student.load_state_dict(student, strict=True)
        opt = self.optimizer.state_dict()
        opt_state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                opt_state.setdefault(int(pid), {})[name] = value.clone()
        groups = []
        for saved, current in zip(state["param_groups"], opt["param_groups"], strict=True):
            # JSON turned tuples (AdamW's betas) into lists: give them their type back.
            restored = {
                k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()
            }
            groups.append({**restored, "params": current["params"]})
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.rng.set_state(tensors["rng.train"])
        meta = state["rings"].get("replay")
        if meta is not None:
            self.replay = ring_from_state("replay", meta, tensors, self.device)
        self.train_steps = int(state["counters"]["train_steps"])
        self.trained_samples = int(state["counters"]["trained_samples"])
        self.credit = float(state["credit"])
        self.last_loss = state["last_loss"]
        # Files saved before dormant heads existed: every head trains.
        self.dormant = frozenset(int(i) for i in state.get("dormant", []))
        self.off_streak = [int(n) for n in state.get("off_streak", [0] * len(self.student))]


#: What AdamW keeps per parameter (a saved ``opt.{param}.{name}`` tensor).
_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")
#: Optimizer settings a saved learner may give (the others must be what this learner uses).
_TUNED_GROUP_KEYS = ("lr", "initial_lr", "betas", "eps", "weight_decay")


def check_trainer_state(
    tensors: Any,
    state: Any,
    student: nn.ModuleList,
    config: DistillConfig,
    num_classes: int | None = None,
) -> None:
    """Check a saved trainer (:meth:`HeadTrainer.state_dict`) against ``student`` (or any heads
    of the same structure) before anything is loaded or allocated: the student's tensors (names,
    shapes, floating dtypes), AdamW's state per parameter and its settings, the random state,
    the counts, and the replay ring within ``config``'s caps (``num_classes``, when known, is
    the width of its teacher logits). Raises a :class:`~earlyexit.CheckpointError` naming the
    field.

    Example:
        >>> tensors, state = trainer.state_dict()  # doctest: +SKIP
        >>> check_trainer_state(tensors, state, trainer.student, trainer.config)  # doctest: +SKIP
    """
    record = expect_dict(state, "state", ("counters", "credit", "param_groups", "rings"))
    counters = expect_dict(record["counters"], "counters", ("train_steps", "trained_samples"))
    for key in ("train_steps", "trained_samples"):
        expect_int(counters[key], f"counters.{key}")
    expect_number(record["credit"], "credit", low=0.0, high=MAX_OWED_STEPS)
    loss = record.get("last_loss")
    if loss is not None:
        expect_number(loss, "last_loss", finite=False, nan=True)
    exits = len(student)
    for i, index in enumerate(expect_list(record.get("dormant", []), "dormant")):
        expect_int(index, f"dormant[{i}]", 0, max(exits - 1, 0))
    streaks = expect_list(record.get("off_streak", [0] * exits), "off_streak", exits)
    for i, n in enumerate(streaks):
        expect_int(n, f"off_streak[{i}]", 0)
    # The student: the heads' tensors, any floating dtype (values are copied into the student).
    current = student.state_dict()
    saved = {k[len("student.") :] for k in tensors if k.startswith("student.")}
    if saved != set(current):
        raise CheckpointError(
            "the saved student does not fit these heads (missing "
            f"{sorted(set(current) - saved)[:5]}, unexpected {sorted(saved - set(current))[:5]})"
        )
    for key, want in current.items():
        dtypes = FLOAT_DTYPES if want.is_floating_point() else (want.dtype,)
        expect_tensor(tensors, f"student.{key}", dtypes, tuple(want.shape))
    # AdamW: for each parameter (in the student's order) nothing, or step + both moments.
    shapes = [tuple(p.shape) for p in student.parameters()]
    found: dict[int, set[str]] = {}
    for key in tensors:
        if not key.startswith("opt."):
            continue
        parts = key.split(".", 2)
        pid, name = (parts[1], parts[2]) if len(parts) == 3 else ("", "")
        if not pid.isdigit() or int(pid) >= len(shapes) or name not in _ADAM_STATE:
            raise CheckpointError(
                f"tensor {key!r} is not AdamW state of these heads (expected "
                f"opt.<0..{len(shapes) - 1}>.<{'|'.join(_ADAM_STATE)}>)"
            )
        shape = () if name == "step" else shapes[int(pid)]
        expect_tensor(tensors, key, FLOAT_DTYPES, shape)
        found.setdefault(int(pid), set()).add(name)
    for pid, names in found.items():
        if names != set(_ADAM_STATE):
            raise CheckpointError(
                f"AdamW state of parameter {pid} lacks {sorted(set(_ADAM_STATE) - names)}"
            )
    check_param_groups(record["param_groups"], config)
    check_generator_state(tensors, "rng.train")
    meta = expect_dict(record["rings"], "rings").get("replay")
    if meta is not None:
        fields = feature_fields(meta, "replay", len(student), config.storage_dtype)
        teacher = saved_fields(meta, "replay").get("teacher", ((), torch.float32))[0]
        width = num_classes if num_classes is not None else (teacher[0] if len(teacher) == 1 else 0)
        fields["teacher"] = ((width,), torch.float32)
        check_ring_state("replay", meta, tensors, fields, config.replay_samples)
    elif any(k.startswith("replay.") for k in tensors):
        raise CheckpointError("replay tensors are saved but 'rings.replay' does not describe them")


def check_param_groups(groups: Any, config: DistillConfig) -> None:
    """Check saved AdamW settings: one group; finite ``lr``, ``eps``, ``weight_decay``, two
    ``betas`` in [0, 1); every other setting as this learner's AdamW has it (a flag such as
    ``maximize`` or ``fused`` is not something a file may switch on).

    Example:
        >>> check_param_groups([{"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8,
        ...     "weight_decay": 0.0}], DistillConfig())
    """
    reference = torch.optim.AdamW(
        [torch.zeros(1, requires_grad=True)], lr=config.lr, weight_decay=config.weight_decay
    ).param_groups[0]
    fixed = {k: v for k, v in reference.items() if k not in (*_TUNED_GROUP_KEYS, "params")}
    groups = expect_list(groups, "param_groups", 1)
    group = expect_dict(groups[0], "param_groups[0]", ("lr", "betas", "eps", "weight_decay"))
    for key, value in group.items():
        where = f"param_groups[0].{key}"
        if key in ("lr", "initial_lr", "weight_decay", "eps"):  # AdamW computes in float32
            expect_number(value, where, low=0.0, high=float(torch.finfo(torch.float32).max))
        elif key == "betas":
            betas = list(value) if isinstance(value, tuple) else value  # in memory: a tuple
            for i, beta in enumerate(expect_list(betas, where, 2)):
                expect_number(beta, f"{where}[{i}]", low=0.0, high=1.0)
                if beta >= 1.0:
                    raise field_error(f"{where}[{i}]", "a number in [0, 1)", beta)
        elif key not in fixed:
            raise field_error("param_groups[0]", f"AdamW settings among {sorted(reference)}", key)
        elif value != fixed[key] or type(value) is not type(fixed[key]):
            raise field_error(where, repr(fixed[key]), value)


def check_generator_state(tensors: Any, key: str) -> None:
    """Check a saved random-number generator state: a CPU generator's uint8 state that one
    accepts (tried on a scratch generator)."""
    want = torch.Generator().get_state()
    saved = expect_tensor(tensors, key, (torch.uint8,), tuple(want.shape))
    try:
        torch.Generator().set_state(saved)
    except RuntimeError as err:
        raise CheckpointError(f"tensor {key!r} is not a random generator state: {err}") from None
