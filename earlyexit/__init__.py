"""earlyexit: early exits for pretrained timm/torchvision classifiers, learned online.

Example:
    >>> import timm, torch, earlyexit as ee
    >>> eem = ee.wrap(timm.create_model("resnet18").eval())
    >>> eem.predict(torch.randn(2, 3, 224, 224)).exit_index  # gates closed: the full model answers
    tensor([4, 4])
"""

from . import evaluation
from ._backbones import (
    BackboneAdapter,
    FeatureLayout,
    register_adapter,
    supported_families,
    unregister_adapter,
)
from .cartography import CartographyMeter, DataMap, DifficultyRouter
from .cascade import (
    Cascade,
    EarlyExitTier,
    EnsembleTier,
    LocalTier,
    RemoteTier,
    RemoteTierError,
)
from .costs.placement import Link, Site, StageProfile, evaluate_placement, optimise_placement
from .distill import DistillConfig, OnlineDistiller
from .errors import (
    CheckpointError,
    ConfigError,
    EarlyExitError,
    InputError,
    UnsupportedModelError,
)
from .gates import (
    AgreementGate,
    Gate,
    GateContext,
    LearnedGate,
    PatienceGate,
    fit_learned_gate,
    gate_scores,
    make_gate,
    register_gate,
)
from .heads import ExitHead, HeadSpec, register_head
from .io import load
from .model import EarlyExitModel, ExitPoint, ExitRecord, ExitResult, ExitTrace
from .supervisors import FallbackError, Supervisor, UntrustedPredictionError
from .wrapping import exit_candidates, wrap

__version__ = "0.1.0"

__all__ = [
    "AgreementGate",
    "BackboneAdapter",
    "CartographyMeter",
    "Cascade",
    "CheckpointError",
    "ConfigError",
    "DataMap",
    "DifficultyRouter",
    "DistillConfig",
    "EarlyExitError",
    "EarlyExitModel",
    "EarlyExitTier",
    "EnsembleTier",
    "ExitHead",
    "ExitPoint",
    "ExitRecord",
    "ExitResult",
    "ExitTrace",
    "FallbackError",
    "FeatureLayout",
    "Gate",
    "GateContext",
    "LearnedGate",
    "HeadSpec",
    "InputError",
    "Link",
    "LocalTier",
    "OnlineDistiller",
    "PatienceGate",
    "RemoteTier",
    "RemoteTierError",
    "Site",
    "StageProfile",
    "Supervisor",
    "UnsupportedModelError",
    "UntrustedPredictionError",
    "__version__",
    "evaluate_placement",
    "evaluation",
    "exit_candidates",
    "fit_learned_gate",
    "gate_scores",
    "load",
    "make_gate",
    "optimise_placement",
    "register_adapter",
    "register_gate",
    "register_head",
    "supported_families",
    "unregister_adapter",
    "wrap",
]
