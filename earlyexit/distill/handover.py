"""What a learner takes over from the heads' earlier training (a :class:`HeadChooser`'s).

A learner that starts from heads trained elsewhere on the same traffic should carry on, not start
again: with an empty replay its first steps would fit the first few rows over and over, and a
fresh AdamW would move every weight by about the learning rate on its first steps (Adam's first
updates are normalised), undoing what the heads learned. So the heads come with their replay rows,
their optimizer state and, when the rows were held out under the learner's own content split and
never used to choose anything, evidence.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Handover:
    """Rows and state for :meth:`OnlineDistiller.take_over`, one entry per exit of its model.

    Attributes:
        evidence_z: per exit, the heads' inputs ``z`` (``[N, ...]``) of held-out rows.
        evidence_labels: ``[N]`` int64, the full model's answers on those rows.
        replay_z: per exit, the heads' inputs of the rows the heads trained on (``[M, ...]``).
        replay_teacher: ``[M, num_classes]``, the full model's logits on those rows.
        optimizer_states: per exit, AdamW's state of each of the head's parameters, in the
            order of ``head.parameters()`` (``{}`` for a parameter without state).
        trained_samples: training rows the heads have learned from (drives ``lr_half_life``).
    """

    evidence_z: list[Tensor]
    evidence_labels: Tensor
    replay_z: list[Tensor]
    replay_teacher: Tensor
    optimizer_states: list[list[dict[str, Tensor]]]
    trained_samples: int


__all__ = ["Handover"]
