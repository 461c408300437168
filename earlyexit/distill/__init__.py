"""Online self-distillation of exit heads from live traffic (see :class:`OnlineDistiller`).

Example:
    >>> import timm, earlyexit as ee
    >>> eem = ee.wrap(timm.create_model("resnet18").eval())
    >>> learner = ee.OnlineDistiller(eem, ee.DistillConfig(target_agreement=0.99))
    >>> res = learner.step(batch)  # doctest: +SKIP
"""

from .buffers import TensorRing
from .config import DistillConfig
from .learner import BackgroundTrainingError, OnlineDistiller, distillation_loss

__all__ = [
    "BackgroundTrainingError",
    "DistillConfig",
    "OnlineDistiller",
    "TensorRing",
    "distillation_loss",
]
