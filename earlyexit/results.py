"""What serving returns and records: the value types of :class:`~earlyexit.model.EarlyExitModel`.

``ExitPoint`` describes an exit, ``ExitResult`` is a served batch's answers, and ``ExitRecord`` /
``ExitTrace`` what a traced call computed on the way (the learner's teacher signal).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class ExitPoint:
    """One early exit.

    Attributes:
        name: module name in the base model (``model.get_submodule(name)``).
        index: position of that module among the backbone's candidate exit points
            (``eem.candidates``), so ``wrap(model, exits=[e.index for e in eem.exits])`` rebuilds it.
        channels: channels of the feature the head reads.
        macs: per-sample MACs of a sample that leaves here: the backbone up to this exit plus every
            head evaluated on the way, this one included, at the model's input size.
    """

    name: str
    index: int
    channels: int
    macs: int


@dataclass
class ExitResult:
    """What serving a batch returns; every tensor is in the caller's row order.

    Attributes:
        logits: ``[B, num_classes]`` logits of the head (or final classifier) that answered.
        exit_index: ``[B]`` int64; ``i < num_exits``: exit ``i`` answered, ``num_exits``: the full model.
        confidence: ``[B]`` float32, the gate score that decided (NaN where the answering
            logits are not finite).
        accepted: ``[B]`` bool, the final supervisor's verdict (all True without a supervisor;
            early answers are always accepted: the supervisor watches the full model's output).
            A full-model answer whose logits are not all finite (NaN/Inf: a finite but extreme
            input can overflow a model), or that the gate cannot score (NaN confidence), is never
            accepted, with or without a supervisor. An early
            exit never answers with non-finite logits: such a row scores NaN, which passes no
            gate, so it runs on to the full model.
    """

    logits: Tensor
    exit_index: Tensor
    confidence: Tensor
    accepted: Tensor

    def __len__(self) -> int:
        return self.logits.shape[0]


@dataclass
class ExitRecord:
    """What one exit saw during a traced call (for learning and calibration).

    ``rows`` are caller rows of the samples the head was evaluated on; ``z`` the head's reduced
    input (``head.reduce(feature)``), ``logits`` its output and ``scores`` the gate scores.
    """

    rows: Tensor
    z: Tensor
    logits: Tensor
    scores: Tensor


@dataclass
class ExitTrace:
    """Everything a traced call computed on the way, beyond the served answers.

    Attributes:
        exits: per exit, an :class:`ExitRecord` (``None`` if the head was not evaluated).
        final_rows: caller rows that ran to the end (audited samples included).
        final_logits: the base model's logits for ``final_rows`` (``None`` if none ran to the end).
    """

    exits: list[ExitRecord | None]
    final_rows: Tensor
    final_logits: Tensor | None


__all__ = ["ExitPoint", "ExitRecord", "ExitResult", "ExitTrace"]
