"""EarlyExitModel: serve a wrapped classifier, letting confident samples leave at early exits.

How a batch flows (see the design notes): the base model runs as usual, but a forward hook sits on
each exit module. While *this wrapper* is serving a call on *this thread*, the hook at exit ``i``
runs head ``i`` on the feature, scores it with the gate, records the samples whose score passes
threshold ``i`` and returns the feature of the remaining rows only, so every later layer runs on
fewer rows. When no row remains the hook raises a private exception that stops the forward pass.
Outside such a call the hooks return ``None`` and change nothing, on any thread.

The hooks and the state of one served call live in :mod:`earlyexit.exit_hooks`, the value types
in :mod:`earlyexit.results`, the exit rule and path costs in :mod:`earlyexit.routing`; this module
is the wrapper that installs the hooks, serves calls through them and assembles the answers.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Sequence
from typing import NoReturn

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .backbones import FeatureLayout
from .errors import ConfigError, InputError, UnsupportedModelError
from .exit_hooks import (
    ExitRun,
    HookRuntime,
    StopForward,
    all_finite,
    register_hooks,
    remove_handles,
    strip_copied_hooks,
)
from .gates import Gate, GateContext, distrust_non_finite
from .heads import ExitHead
from .io import checked_target, save_early_exit_model
from .results import ExitPoint, ExitRecord, ExitResult, ExitTrace
from .routing import (
    check_thresholds,
    exit_path_macs,
    gates_open,
    heads_evaluated,
    scatter_answers,
)
from .supervisors import Supervisor

# Re-exported: the value types, the non-finite rule and the path arithmetic were first defined
# here; they now live in results, exit_hooks and routing.
__all__ = [
    "EarlyExitModel",
    "ExitPoint",
    "ExitRecord",
    "ExitResult",
    "ExitTrace",
    "distrust_non_finite",
    "exit_path_macs",
    "heads_evaluated",
]


#: ``head_kind`` of a wrapper whose exits do not all have the same head kind.
MIXED_HEADS = "mixed"


def _per_exit_kinds(head_kind: str | Sequence[str], num_exits: int) -> tuple[str, ...]:
    """One head kind per exit from one kind for all, or from a list of one kind per exit."""
    if isinstance(head_kind, str):
        return (head_kind,) * num_exits
    kinds = tuple(head_kind)
    if len(kinds) != num_exits or not all(isinstance(k, str) for k in kinds):
        raise ConfigError(
            f"head_kind must be one string or {num_exits} strings (one per exit), got {head_kind!r}"
        )
    return kinds


_NOT_SCRIPTABLE = (
    "torch.jit.script/trace cannot capture an EarlyExitModel: its exits drop rows from the batch "
    "mid-forward, depending on the data, which a static graph cannot express. To keep or ship "
    "it, use eem.save(path) and earlyexit.load(model, path); to script or trace the full model, "
    "use eem.base_model."
)


class EarlyExitModel(nn.Module):
    """A base classifier with exit heads; build it with :func:`earlyexit.wrap`.

    Only the heads are registered submodules (``parameters()``, ``state_dict()`` and ``train()``
    see only them); the base model is held beside them and never modified. ``to()``/``cuda()``/
    ``half()`` move or cast the heads *and* the base model, since they are served together.

    ``copy.deepcopy(eem)``, ``pickle`` and ``torch.save(eem)`` give an independent wrapper with
    its own copy of the base model and its own hooks (``torch.load`` then needs
    ``weights_only=False``; :meth:`save` and :func:`earlyexit.load` keep only the heads and need
    no pickle). ``torch.jit.script``/``trace`` are refused: exits change the batch mid-forward.

    Example:
        >>> import timm, torch, earlyexit as ee
        >>> eem = ee.wrap(timm.create_model("resnet18").eval())
        >>> eem.set_thresholds([0.9] * eem.num_exits)
        >>> res = eem.predict(torch.randn(4, 3, 224, 224))
        >>> res.exit_index.shape
        torch.Size([4])
    """

    def __init__(
        self,
        base_model: nn.Module,
        *,
        family: str,
        exits: Sequence[ExitPoint],
        layouts: Sequence[FeatureLayout],
        heads: Sequence[ExitHead],
        head_kind: str | Sequence[str],
        head_budget: float,
        head_macs: Sequence[int],
        backbone_macs: Sequence[int],
        base_macs: int,
        gate: Gate,
        supervisor: Supervisor | None,
        input_size: tuple[int, int, int],
        fixed_input_size: bool,
        num_classes: int,
        candidates: Sequence[str],
    ) -> None:
        super().__init__()
        # Not a submodule: keeps train()/state_dict()/parameters() off the base model.
        object.__setattr__(self, "base_model", base_model)
        self.heads = nn.ModuleList(heads)
        self.family = family
        # One per exit ("custom" for a callable factory); head_kind summarises them.
        self._head_kinds = _per_exit_kinds(head_kind, len(exits))
        self.head_budget = head_budget
        self.gate = gate
        self.supervisor = supervisor
        self.input_size = tuple(input_size)
        self.fixed_input_size = fixed_input_size
        self.num_classes = num_classes
        self.candidates = tuple(candidates)
        self.layouts = tuple(layouts)
        self.head_macs = tuple(int(m) for m in head_macs)
        self.backbone_macs = tuple(int(m) for m in backbone_macs)
        self.base_macs = int(base_macs)
        self._exits = tuple(exits)
        self._thresholds: tuple[float, ...] = (math.inf,) * len(self._exits)
        strip_copied_hooks(base_model)
        self._install_hooks()

    def _install_hooks(self) -> None:
        """A fresh runtime and this wrapper's own hooks on its base model."""
        self._runtime = HookRuntime()
        self._handles: list[RemovableHandle] = register_hooks(
            self.base_model, self._exits, self._runtime
        )
        # Hooks must not outlive the wrapper: remove them when it is garbage collected.
        self._finalizer = weakref.finalize(self, remove_handles, self._handles)

    # ------------------------------------------------------------------ description
    @property
    def exits(self) -> tuple[ExitPoint, ...]:
        """The early exits, in execution order."""
        return self._exits

    @property
    def head_kinds(self) -> tuple[str, ...]:
        """The head kind of each exit, in exit order (``"custom"``: built by a callable).

        Example:
            >>> ee.wrap(model, head=["linear", "conv", "conv", "mlp"]).head_kinds  # doctest: +SKIP
            ('linear', 'conv', 'conv', 'mlp')
        """
        return self._head_kinds

    @property
    def head_kind(self) -> str:
        """The head kind every exit shares, or ``"mixed"`` when they differ (see
        :attr:`head_kinds`)."""
        kinds = set(self._head_kinds)
        return self._head_kinds[0] if len(kinds) == 1 else MIXED_HEADS

    @property
    def num_exits(self) -> int:
        """Number of early exits (the final classifier is not counted)."""
        return len(self._exits)

    @property
    def thresholds(self) -> tuple[float, ...]:
        """One gate threshold per exit; ``inf`` = closed (a new model starts closed)."""
        return self._thresholds

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """Set every exit's threshold at once (``inf`` closes an exit, ``-inf`` sends everything out).

        Example:
            >>> eem.set_thresholds([0.95, 0.9, 0.9, float("inf")])  # doctest: +SKIP
        """
        checked = check_thresholds(thresholds, self.num_exits)
        self._thresholds = checked  # one assignment: concurrent calls see old or new, whole

    def path_macs(
        self, thresholds: Sequence[float] | None = None, *, gate: Gate | None = None
    ) -> tuple[int, ...]:
        """Per-sample MACs of each path under ``thresholds`` (default: the current ones) and
        ``gate`` (default: the current one; a gate that looks back makes earlier heads run).

        Entry ``i < num_exits`` is a sample leaving at exit ``i``; the last entry a sample that runs
        to the end. Heads that are skipped (closed gate, no later gate needing them) cost nothing.
        """
        chosen = self._thresholds if thresholds is None else tuple(thresholds)
        sources = (self.gate if gate is None else gate).history_sources(self.num_exits)
        evaluated = heads_evaluated(gates_open(chosen), sources)
        return exit_path_macs(self.backbone_macs, self.head_macs, self.base_macs, evaluated)

    # ------------------------------------------------------------------ serving
    def forward(self, x: Tensor) -> Tensor:
        """The logits of whichever exit answered each sample (see :meth:`predict`)."""
        return self.predict(x).logits

    def predict(self, x: Tensor) -> ExitResult:
        """Serve a batch: confident samples leave early, the rest run to the end.

        Example:
            >>> res = eem.predict(torch.randn(8, 3, 224, 224))  # doctest: +SKIP
            >>> res.exit_index  # which exit answered each sample  # doctest: +SKIP

        With a final supervisor its policy applies here: rejected full-model answers are flagged
        (``accepted=False``), raise :class:`~earlyexit.supervisors.UntrustedPredictionError`, or are
        answered by its fallback. :meth:`trace` only flags (learning must not be interrupted).
        """
        if torch.jit.is_tracing():
            raise UnsupportedModelError(_NOT_SCRIPTABLE)
        result, _ = self._serve(x, capture=False, audit=None)
        if self.supervisor is not None:
            result = self.supervisor.enforce(x, result)
        return result

    def trace(
        self, x: Tensor, *, audit: Tensor | None = None, input_checked: bool = False
    ) -> tuple[ExitResult, ExitTrace]:
        """Serve a batch and also return what every head saw (used by online learning).

        Every head is evaluated on every sample that reaches it. ``audit`` (``[B]`` bool) marks
        samples that, having been answered early, still run to the end so their early answer can
        be checked against the full model. ``input_checked=True``: the caller has already run
        :meth:`check_input` on ``x`` (the NaN scan is a full pass over the input, too costly to
        pay twice next to a small backbone).

        Example:
            >>> eem.check_input(x)  # doctest: +SKIP
            >>> result, trace = eem.trace(x, audit=audit, input_checked=True)  # doctest: +SKIP
        """
        if torch.jit.is_tracing():
            raise UnsupportedModelError(_NOT_SCRIPTABLE)
        if audit is not None:
            if not isinstance(audit, Tensor) or audit.dtype != torch.bool or audit.dim() != 1:
                raise InputError("audit must be a 1-D bool tensor with one entry per sample")
            if isinstance(x, Tensor) and audit.shape[0] != x.shape[0]:
                raise InputError(f"audit has {audit.shape[0]} entries for a batch of {x.shape[0]}")
        return self._serve(x, capture=True, audit=audit, checked=input_checked)

    def _heads_to_evaluate(
        self, thresholds: tuple[float, ...], capture: bool, gate: Gate
    ) -> tuple[bool, ...]:
        if capture:
            return (True,) * self.num_exits
        return heads_evaluated(gates_open(thresholds), gate.history_sources(self.num_exits))

    def _serve(
        self, x: Tensor, *, capture: bool, audit: Tensor | None, checked: bool = False
    ) -> tuple[ExitResult, ExitTrace]:
        """``checked``: the caller has already run ``check_input(x)`` (the NaN scan is a full
        pass over the input, too costly to pay twice next to a small backbone)."""
        if not self._handles:
            raise RuntimeError(
                "this EarlyExitModel was removed (eem.remove()); wrap the model again"
            )
        if not checked:
            self.check_input(x)
        if self.base_model.training:
            raise InputError(
                "the base model is in training mode: serving would change its BatchNorm statistics "
                "and dropout would make answers random. Call model.eval() before serving."
            )
        batch = x.shape[0]
        if batch == 0:
            return self._empty_result(x), ExitTrace(
                [None] * self.num_exits, x.new_zeros(0, dtype=torch.long), None
            )
        # One consistent (heads, thresholds) pair for the whole call. A publisher closes the gates,
        # swaps the heads, then sets new thresholds (each a new tuple); if the thresholds did not
        # change while the heads were read, the heads belong to them (or the gates were closed).
        # The gate is read inside the same check: a publisher swaps heads, then the gate.
        while True:
            thresholds = self._thresholds
            heads = tuple(self.heads)
            gate = self.gate
            if self._thresholds is thresholds:
                break
        run = ExitRun(
            batch,
            x.device,
            heads,
            thresholds,
            gate,
            self._heads_to_evaluate(thresholds, capture, gate),
            capture,
            None if audit is None else audit.to(x.device),
        )
        outer = self._runtime.run
        self._runtime.run = run
        try:
            with torch.no_grad():
                try:
                    final = self.base_model(x)
                except StopForward:
                    final = None
                except RuntimeError as err:
                    if tuple(x.shape[2:]) != self.input_size[1:]:
                        raise InputError(
                            f"the base model could not process an input of size {tuple(x.shape[2:])} "
                            f"(it was built for {self.input_size[1:]}): {err}"
                        ) from err
                    raise
                return self._assemble(run, final, batch, x)
        finally:
            self._runtime.run = outer

    def _assemble(
        self, run: ExitRun, final: Tensor | None, batch: int, x: Tensor
    ) -> tuple[ExitResult, ExitTrace]:
        if final is not None and not isinstance(final, Tensor):
            raise TypeError(
                f"the base model returned {type(final).__name__}; earlyexit serves classifiers that "
                "return a logits tensor (put the model in eval mode)"
            )
        answers = list(run.answers)
        accepted_parts: list[tuple[Tensor, Tensor]] = []
        if final is not None:
            rows, logits, history = run.rows, final, run.history
            if answers:  # some rows answered early but ran on (audits): keep the undecided
                undecided = torch.nonzero(~run.decided).squeeze(1)
                rows, logits = rows[undecided], final[undecided]
                history = [h[undecided] if h is not None else None for h in history]
            # NaN wherever the logits are not finite: such an answer is served flagged (not
            # accepted), never as a confident class. (scores == scores: not NaN, in one op.)
            scores = run.gate.checked_score(logits, GateContext(self.num_exits, rows, history))
            finite = scores == scores
            if not answers and self.supervisor is None:
                # Nobody left early (gates closed, or none confident): the model's own output, as
                # is, with no scatter into a new tensor.
                exit_index = torch.full((batch,), self.num_exits, dtype=torch.long, device=x.device)
                result = ExitResult(final, exit_index, scores, finite)
                return result, ExitTrace(run.records, run.rows, final)
            answers.append((rows, logits, self.num_exits, scores))
            if self.supervisor is not None:
                accepted_parts.append((rows, self.supervisor.accept(logits) & finite))
            else:
                accepted_parts.append((rows, finite))
        dtype = final.dtype if final is not None else answers[0][1].dtype
        device = x.device
        out_logits, exit_index, confidence = scatter_answers(
            answers, batch, num_classes=self.num_classes, dtype=dtype, device=device
        )
        accepted = torch.ones(batch, dtype=torch.bool, device=device)
        for rows, verdict in accepted_parts:
            accepted[rows] = verdict
        result = ExitResult(out_logits, exit_index, confidence, accepted)
        trace = ExitTrace(run.records, run.rows, final)
        return result, trace

    def _empty_result(self, x: Tensor) -> ExitResult:
        dtype = (
            torch.get_autocast_dtype(x.device.type)
            if torch.is_autocast_enabled(x.device.type)
            else x.dtype
        )
        return ExitResult(
            x.new_zeros(0, self.num_classes, dtype=dtype),
            x.new_zeros(0, dtype=torch.long),
            x.new_zeros(0, dtype=torch.float32),
            x.new_zeros(0, dtype=torch.bool),
        )

    def check_input(self, x: object) -> None:
        """Raise :class:`~earlyexit.InputError` unless ``x`` is a batch this model can serve.

        Checks type, rank, channels, image size, dtype, device and NaN/Inf, with a message that
        says how to fix the batch. Serving runs it anyway; call it first to reject a batch before
        any other work (then pass ``input_checked=True`` to :meth:`trace`).

        Example:
            >>> eem.check_input(torch.randn(8, 3, 224, 224))  # doctest: +SKIP
        """
        if not isinstance(x, Tensor):
            raise InputError(f"expected a torch.Tensor batch [B, C, H, W], got {type(x).__name__}")
        c, h, w = self.input_size
        if x.dim() != 4:
            hint = (
                " (a single image? add the batch dimension with x.unsqueeze(0))"
                if x.dim() == 3
                else ""
            )
            raise InputError(
                f"expected a batch of images [B, {c}, H, W], got shape {tuple(x.shape)}{hint}"
            )
        if x.shape[1] != c:
            hint = " (channels last? use x.permute(0, 3, 1, 2))" if x.shape[-1] == c else ""
            raise InputError(f"expected {c} channels, got shape {tuple(x.shape)}{hint}")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise InputError(f"the images are empty ({x.shape[2]}x{x.shape[3]} pixels)")
        if not x.is_floating_point():
            raise InputError(
                f"expected a floating-point batch, got {x.dtype}: convert with x.float() and apply the "
                "model's normalisation (e.g. timm.data.create_transform / weights.transforms())"
            )
        param = next(self.base_model.parameters(), None)
        if param is not None:
            if x.device != param.device:
                raise InputError(
                    f"the batch is on {x.device} but the model is on {param.device}: use x.to({str(param.device)!r})"
                )
            if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
                raise InputError(
                    f"the batch is {x.dtype} but the model is {param.dtype}: use x.to({param.dtype}) "
                    "or run under torch.autocast"
                )
        if self.fixed_input_size and tuple(x.shape[2:]) != (h, w):
            raise InputError(
                f"this model only takes {h}x{w} images, got {x.shape[2]}x{x.shape[3]}: resize first"
            )
        if x.numel() and not all_finite(x):
            raise InputError(
                "the batch contains NaN or Inf values; clean or drop those samples before serving"
            )

    def count_macs(
        self,
        input_shape: Sequence[int] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> int:
        """Per-sample MACs of serving a zero batch of ``input_shape`` with the current thresholds
        (heads included). For expected MACs over real traffic use :meth:`path_macs` with exit rates.
        """
        from .costs.macs import MacCounter

        param = next(self.base_model.parameters())
        shape = tuple(input_shape) if input_shape is not None else (1, *self.input_size)
        x = torch.zeros(shape, device=device or param.device, dtype=dtype or param.dtype)
        with MacCounter() as counter:
            self.predict(x)
        return counter.total // max(shape[0], 1)

    # ------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Detach every hook from the base model. The wrapper cannot serve afterwards."""
        self._finalizer()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        self.base_model._apply(fn, recurse)
        return self

    # ------------------------------------------------------------------ copies
    # copy.deepcopy, pickle and torch.save copy the heads, the gate and the base model; the copy
    # installs its own hooks on its own base model (the original's hooks arrive there as inert
    # copies and are stripped), so the two serve, learn and remove() independently.
    _UNCOPIED = ("_runtime", "_handles", "_finalizer")

    def __getstate__(self) -> dict[str, object]:
        state = {k: v for k, v in self.__dict__.items() if k not in self._UNCOPIED}
        state["_removed"] = not self._handles  # a removed wrapper's copy is removed too
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        state = dict(state)
        removed = bool(state.pop("_removed", False))
        if "head_kind" in state:  # pickled before per-exit kinds: one kind for every exit
            exits = state.get("_exits", ())
            state["_head_kinds"] = _per_exit_kinds(state.pop("head_kind"), len(exits))
        super().__setstate__(state)
        strip_copied_hooks(self.base_model)
        self._install_hooks()
        if removed:
            self.remove()

    def __prepare_scriptable__(self) -> NoReturn:
        # torch.jit.script calls this first: fail here, before it fails deep inside.
        raise UnsupportedModelError(_NOT_SCRIPTABLE)

    def extra_repr(self) -> str:
        names = ", ".join(e.name for e in self._exits)
        return f"family={self.family!r}, exits=[{names}], gate={self.gate!r}"

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write heads, thresholds, config and the base model's fingerprint to one safetensors file
        (atomically: an interrupted save leaves the previous file intact).

        This is the portable way to keep a wrapper: ``earlyexit.load(model, path)`` rebuilds it on
        the base model and checks it is the same one. (``torch.save(eem)`` pickles the whole
        object, base model included; reading it back needs ``torch.load(f, weights_only=False)``,
        which must only be used on files you trust.)

        Raises:
            ConfigError: ``path`` is empty or names a folder.

        Example:
            >>> eem.save("heads.safetensors")  # doctest: +SKIP
        """
        checked_target(path)  # before hashing the base model's weights
        save_early_exit_model(self, path)
