"""Online self-distillation of exit heads from live traffic (see :class:`OnlineDistiller`).

One job per module: ``config`` (the knobs), ``evidence`` (content split, audits, evidence ring),
``trainer`` (student heads, optimizer, replay), ``gate_data`` (the learned gate's data),
``calibrator`` (evidence -> candidate policy), ``drift`` (drift monitor), ``traffic`` (counts),
``schedule`` (calibration schedule, time budget, phase), ``stats`` (the stats record), ``worker``
(background thread), ``replica`` (serving in another process for one learner), ``head_choice``
(places and head kinds chosen on the first traffic, :class:`HeadChooser`), ``handover`` (what a
learner takes over from heads trained before it) and ``learner`` (:class:`OnlineDistiller`, which
coordinates them).

Example:
    >>> import timm, earlyexit as ee
    >>> eem = ee.wrap(timm.create_model("resnet18").eval())
    >>> learner = ee.OnlineDistiller(eem, ee.DistillConfig(target_agreement=0.99))
    >>> res = learner.step(batch)  # doctest: +SKIP
"""

from ..errors import BackgroundTrainingError
from .buffers import TensorRing
from .calibrator import Candidate, ExitState
from .config import DistillConfig
from .handover import Handover
from .head_choice import HeadChoice, HeadChooser
from .learner import OnlineDistiller
from .replica import HeadsRelease, ServingReplica
from .schedule import Phase
from .stats import LearnerStats
from .trainer import distillation_loss

__all__ = [
    "BackgroundTrainingError",
    "Candidate",
    "DistillConfig",
    "ExitState",
    "Handover",
    "HeadChoice",
    "HeadChooser",
    "HeadsRelease",
    "LearnerStats",
    "OnlineDistiller",
    "Phase",
    "ServingReplica",
    "TensorRing",
    "distillation_loss",
]
