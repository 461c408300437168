"""What the server serves a batch with: the online learner, the learner of heads chosen on the first
traffic (``--head auto``), saved heads as they are (``--frozen``), or the base model alone
(``--plain``).

Both answer a batch the same way (one JSON-ready prediction per row: label, probability, exit,
accepted) so that the same server, decoding, batching and JSON serve either, and a benchmark
compares like with like. Neither imports the HTTP packages.

Every method runs on the server's one serving thread (see :mod:`.batcher`), so a publication of
new heads by the learner (which happens inside :meth:`LearnerBackend.serve` or
:meth:`LearnerBackend.calibrate`) never interleaves with another call: the heads version read after
a batch is the one that served it, and a save writes one consistent set of heads and thresholds.

Example:
    >>> backend = LearnerBackend(ee.OnlineDistiller(eem, ee.DistillConfig(background=True)))  # doctest: +SKIP
    >>> backend.serve(x).predictions[0]  # doctest: +SKIP
    {'label': 3, 'probability': 0.91, 'exit': 1, 'accepted': True}
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .._json import json_safe
from ..distill import DistillConfig, HeadChoice, HeadChooser, OnlineDistiller
from ..model import EarlyExitModel

__all__ = [
    "Backend",
    "ChoosingBackend",
    "FrozenBackend",
    "LearnerBackend",
    "NotAvailable",
    "PlainBackend",
    "ServedBatch",
    "answers",
]


class NotAvailable(Exception):
    """The backend cannot do this (``--plain`` has no heads to save or calibrate)."""


@dataclass(frozen=True)
class ServedBatch:
    """The answers to one served batch, in row order, and the heads version that gave them."""

    predictions: list[dict[str, Any]]
    heads_version: int

    def rows(self, start: int, stop: int) -> ServedBatch:
        """The answers of rows ``start:stop`` (one request's share of a batch)."""
        return ServedBatch(self.predictions[start:stop], self.heads_version)


def answers(logits: Tensor, exit_index: Tensor, accepted: Tensor) -> list[dict[str, Any]]:
    """One prediction per row: argmax label, its softmax probability (from the logits that
    answered), the exit that answered and the final supervisor's verdict.

    A row whose logits are not finite has no probability: it is ``None`` (and such a row is never
    accepted).

    Example:
        >>> answers(torch.tensor([[0.0, 1.0]]), torch.tensor([2]), torch.tensor([True]))
        [{'label': 1, 'probability': 0.7310585975646973, 'exit': 2, 'accepted': True}]
    """
    probabilities = torch.softmax(logits.detach().float(), dim=-1)
    probability, label = probabilities.max(dim=-1)
    finite = torch.isfinite(probability)
    return [
        {
            "label": int(lab),
            "probability": float(p) if ok else None,
            "exit": int(e),
            "accepted": bool(a),
        }
        for lab, p, ok, e, a in zip(
            label.tolist(),
            probability.tolist(),
            finite.tolist(),
            exit_index.tolist(),
            accepted.tolist(),
            strict=True,
        )
    ]


class Backend(Protocol):
    """What the server needs from what serves its batches."""

    #: Early exits (``exit == num_exits`` in an answer: the full model answered).
    num_exits: int
    #: ``(C, H, W)`` of every sample.
    input_size: tuple[int, int, int]
    #: dtype of the batches it serves.
    dtype: torch.dtype

    def serve(self, x: Tensor) -> ServedBatch: ...

    def heads_version(self) -> int: ...

    def failure(self) -> str | None: ...

    def stats(self) -> dict[str, Any]: ...

    def save(self, path: str | Path) -> None: ...

    def save_learner(self, path: str | Path) -> None: ...

    def calibrate(self) -> None: ...

    def close(self) -> None: ...


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    param = next(model.parameters(), None)
    if param is None:
        return torch.float32, torch.device("cpu")
    return param.dtype, param.device


class LearnerBackend:
    """Serve with an :class:`~earlyexit.OnlineDistiller`: every batch is one ``learner.step``.

    The learner should run with ``DistillConfig(background=True)`` so that training and
    calibration happen on its own thread and a batch never waits for them; its calibrated heads
    and thresholds are installed together at the start of a step (the learner's publication).

    ``heads_version`` is the learner's :attr:`~earlyexit.OnlineDistiller.heads_version` (its
    publications and drift closings; 0 before either).
    """

    def __init__(self, learner: OnlineDistiller) -> None:
        self.learner = learner
        eem = learner.eem
        self.num_exits = eem.num_exits
        self.input_size = tuple(eem.input_size)
        self.dtype, self.device = _model_dtype_device(eem.base_model)

    def serve(self, x: Tensor) -> ServedBatch:
        result = self.learner.step(x.to(self.device))
        # Read after the step: publications happen at its start (or in calibrate), on this thread.
        version = self.heads_version()
        return ServedBatch(answers(result.logits, result.exit_index, result.accepted), version)

    def heads_version(self) -> int:
        return self.learner.heads_version

    def failure(self) -> str | None:
        """Why every batch now fails (the learner's thread died), or ``None``."""
        error = self.learner.worker.error
        if error is None:
            return None
        return f"the background trainer failed ({type(error).__name__}: {error})"

    def stats(self) -> dict[str, Any]:
        # Every answered request counts: its batch may still wait for the learner's bookkeeping.
        self.learner.wait_recorded()
        return json_safe(self.learner.stats())

    def save(self, path: str | Path) -> None:
        """Heads and thresholds as :meth:`EarlyExitModel.save` writes them (atomically)."""
        self.learner.eem.save(path)

    def save_learner(self, path: str | Path) -> None:
        """The whole learner (:meth:`OnlineDistiller.save`, atomically): heads, thresholds,
        evidence, replay, counters; :meth:`OnlineDistiller.load` resumes it and
        :func:`earlyexit.load` reads its heads."""
        self.learner.save(path)

    def calibrate(self) -> None:
        self.learner.calibrate()

    def close(self) -> None:
        """Stop the learner's background thread (it finishes its current job first)."""
        self.learner.close()


class ChoosingBackend:
    """``--head auto``: the full model answers while a :class:`~earlyexit.HeadChooser` learns
    every candidate head kind at every candidate place; once it has seen its ``samples``, a
    learner of the chosen heads takes over (:meth:`OnlineDistiller.take_over`) and serves as
    :class:`LearnerBackend` does.

    Answers keep one numbering throughout: ``exit`` is the candidate place that answered (a place
    the choice switched off never answers) and ``num_exits``, the number of candidate places,
    the full model. Until the choice every answer is the full model's, ``save`` and ``calibrate``
    are not available and the heads version is 0; taking over publishes version 1 and the
    learner's later publications count on from there.

    The choice, the wrapping of the chosen heads and the take-over run on the serving thread
    after the batch that completes the choice, so the next batch waits for them once; until
    then the chooser trains the candidates on the serving thread too (within
    ``closed_macs_budget`` of the MACs served per kind), so answers are slower than the full
    model alone while it watches.
    """

    def __init__(self, chooser: HeadChooser, config: DistillConfig) -> None:
        self.config = config
        self.num_exits = len(chooser.places)
        self.places = chooser.places
        self.input_size = tuple(chooser.probe.input_size)
        self.dtype, self.device = _model_dtype_device(chooser.probe.base_model)
        self.choice: HeadChoice | None = None
        self._chooser: HeadChooser | None = chooser
        self._learner: LearnerBackend | None = None
        self._exit_of: list[int] = []  # the chosen model's exit j -> candidate place (or the end)
        self._swap = threading.Lock()  # /stats reads which phase it is from another thread

    def serve(self, x: Tensor) -> ServedBatch:
        learner = self._learner
        if learner is not None:
            served = learner.serve(x)
            for prediction in served.predictions:
                prediction["exit"] = self._exit_of[prediction["exit"]]
            return ServedBatch(served.predictions, 1 + served.heads_version)
        chooser = self._chooser
        assert chooser is not None
        logits = chooser.step(x.to(self.device))
        full = torch.full((logits.shape[0],), self.num_exits, dtype=torch.long)
        served = ServedBatch(answers(logits, full, torch.isfinite(logits).all(dim=-1)), 0)
        if chooser.done:
            self._take_over(chooser)
        return served

    def _take_over(self, chooser: HeadChooser) -> None:
        choice = chooser.finish()
        learner = OnlineDistiller(chooser.wrap(), self.config)
        learner.take_over(chooser.handover())
        chooser.probe.remove()  # the candidates' hooks and buffers go with the chooser
        with self._swap:
            self._exit_of = [self.places.index(place) for place, _ in choice.kept]
            self._exit_of.append(self.num_exits)
            self.choice = choice
            self._learner = LearnerBackend(learner)
            self._chooser = None

    def heads_version(self) -> int:
        learner = self._learner
        return 0 if learner is None else 1 + learner.heads_version()

    def failure(self) -> str | None:
        learner = self._learner
        return None if learner is None else learner.failure()

    def stats(self) -> dict[str, Any]:
        """While choosing: samples seen and how many the choice watches. Then the learner's stats
        counted over the whole stream (``samples`` includes what the chooser served; the
        learner's own count is ``learner_samples``), per-exit figures by candidate place, and
        ``head_choice`` (what was chosen and why)."""
        with self._swap:
            learner, chooser, choice = self._learner, self._chooser, self.choice
        if learner is None or choice is None:
            assert chooser is not None
            return {
                "samples": chooser.seen,
                "choosing": True,
                "choice_samples": chooser.samples,
                "places": list(self.places),
                "mac_saving": 0.0,
            }
        stats = learner.stats()
        stats["learner_samples"] = stats.get("samples", 0)
        stats["samples"] = stats["learner_samples"] + choice.samples
        agreement = stats.get("audited_agreement")
        if isinstance(agreement, list) and len(agreement) == len(self._exit_of) - 1:
            by_place: list[Any] = [None] * self.num_exits
            for j, value in enumerate(agreement):
                by_place[self._exit_of[j]] = value
            stats["audited_agreement"] = by_place
        stats["head_choice"] = json_safe(choice.as_dict())
        return stats

    def save(self, path: str | Path) -> None:
        self._after_choice("save").save(path)

    def save_learner(self, path: str | Path) -> None:
        self._after_choice("save the learner of").save_learner(path)

    def calibrate(self) -> None:
        self._after_choice("calibrate").calibrate()

    def _after_choice(self, what: str) -> LearnerBackend:
        learner, chooser = self._learner, self._chooser
        if learner is None:
            seen = chooser.seen if chooser is not None else 0
            total = chooser.samples if chooser is not None else 0
            raise NotAvailable(
                f"no heads to {what} yet: they are being chosen ({seen} of {total} samples "
                "seen; --choice-samples sets how many)"
            )
        return learner

    def close(self) -> None:
        learner = self._learner
        if learner is not None:
            learner.close()


class FrozenBackend:
    """Serve a wrapped model's heads and thresholds as they are: ``eem.predict`` on every batch.

    Nothing learns, audits or recalibrates, so no sample runs to the end unless its gates send
    it there and no thread works beside serving: the policy of a finished learner, at the cost of
    the wrapped model alone. ``heads_version`` stays 0 (nothing is ever published); ``save``
    writes the heads and thresholds served; ``calibrate`` is not available.
    """

    def __init__(self, eem: EarlyExitModel) -> None:
        self.eem = eem
        self.num_exits = eem.num_exits
        self.input_size = tuple(eem.input_size)
        self.dtype, self.device = _model_dtype_device(eem.base_model)
        self._path_macs = list(eem.path_macs())
        self._exits = [0] * (eem.num_exits + 1)
        self._macs = 0
        self._lock = threading.Lock()  # /stats reads the counts from another thread

    def serve(self, x: Tensor) -> ServedBatch:
        with torch.no_grad():
            result = self.eem.predict(x.to(self.device))
        with self._lock:
            for e in result.exit_index.tolist():
                self._exits[e] += 1
                self._macs += self._path_macs[e]
        return ServedBatch(answers(result.logits, result.exit_index, result.accepted), 0)

    def heads_version(self) -> int:
        return 0

    def failure(self) -> str | None:
        return None

    def stats(self) -> dict[str, Any]:
        """Samples served, answers per exit (the last entry: the full model), the MAC saving
        over them (heads included) and the thresholds served."""
        with self._lock:
            exits, macs = list(self._exits), self._macs
        samples = sum(exits)
        saving = 1.0 - macs / (samples * self.eem.base_macs) if samples else 0.0
        return json_safe(
            {
                "samples": samples,
                "frozen": True,
                "exit_counts": exits,
                "mac_saving": saving,
                "thresholds": list(self.eem.thresholds),
            }
        )

    def save(self, path: str | Path) -> None:
        """The heads and thresholds served, as :meth:`EarlyExitModel.save` writes them."""
        self.eem.save(path)

    def save_learner(self, path: str | Path) -> None:
        raise NotAvailable("--frozen serves saved heads as they are: there is no learner to save")

    def calibrate(self) -> None:
        raise NotAvailable(
            "--frozen serves the loaded heads and thresholds as they are: nothing calibrates; "
            "serve without --frozen to learn and calibrate on the traffic"
        )

    def close(self) -> None:
        return None


class PlainBackend:
    """Serve the base model alone, unwrapped: every answer comes from the full model.

    No exits (``num_exits == 0``, so every answer's ``exit`` is 0, the full model), no learner,
    nothing to save or calibrate. ``accepted`` is whether the logits are finite, as for a wrapped
    model without a final supervisor.
    """

    def __init__(self, model: nn.Module, input_size: tuple[int, int, int]) -> None:
        self.model = model.eval()
        self.num_exits = 0
        self.input_size = tuple(int(v) for v in input_size)
        self.dtype, self.device = _model_dtype_device(model)
        self.samples = 0

    def serve(self, x: Tensor) -> ServedBatch:
        with torch.no_grad():
            logits = self.model(x.to(self.device))
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"the model returned {type(logits).__name__}; earlyexit serves classifiers that "
                "return a logits tensor"
            )
        exits = torch.zeros(x.shape[0], dtype=torch.long)
        accepted = torch.isfinite(logits).all(dim=-1)
        self.samples += x.shape[0]
        return ServedBatch(answers(logits, exits, accepted), 0)

    def heads_version(self) -> int:
        return 0

    def failure(self) -> str | None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"samples": self.samples, "plain": True, "mac_saving": 0.0}

    def save(self, path: str | Path) -> None:
        raise NotAvailable("--plain serves the base model alone: it has no heads to save")

    def save_learner(self, path: str | Path) -> None:
        raise NotAvailable("--plain serves the base model alone: there is no learner to save")

    def calibrate(self) -> None:
        raise NotAvailable("--plain serves the base model alone: it has no heads to calibrate")

    def close(self) -> None:
        return None
