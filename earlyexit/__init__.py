"""earlyexit: early exits for pretrained timm/torchvision classifiers, learned online.

Example:
    >>> import timm, torch, earlyexit as ee
    >>> eem = ee.wrap(timm.create_model("resnet18").eval())
    >>> eem.predict(torch.randn(2, 3, 224, 224)).exit_index  # gates closed: the full model answers
    tensor([4, 4])
"""

from ._backbones import (
    BackboneAdapter,
    FeatureLayout,
    register_adapter,
    supported_families,
    unregister_adapter,
)
from .errors import (
    CheckpointError,
    ConfigError,
    EarlyExitError,
    InputError,
    UnsupportedModelError,
)
from .gates import Gate, GateContext, make_gate, register_gate
from .heads import ExitHead, HeadSpec, register_head
from .io import load
from .model import EarlyExitModel, ExitPoint, ExitRecord, ExitResult, ExitTrace
from .supervisors import Supervisor
from .wrapping import exit_candidates, wrap

__version__ = "0.1.0"

__all__ = [
    "BackboneAdapter",
    "CheckpointError",
    "ConfigError",
    "EarlyExitError",
    "EarlyExitModel",
    "ExitHead",
    "ExitPoint",
    "ExitRecord",
    "ExitResult",
    "ExitTrace",
    "FeatureLayout",
    "Gate",
    "GateContext",
    "HeadSpec",
    "InputError",
    "Supervisor",
    "UnsupportedModelError",
    "__version__",
    "exit_candidates",
    "load",
    "make_gate",
    "register_adapter",
    "register_gate",
    "register_head",
    "supported_families",
    "unregister_adapter",
    "wrap",
]
