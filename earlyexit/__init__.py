"""earlyexit: early exits for pretrained timm/torchvision classifiers, learned online.

Example:
    >>> import timm, torch, earlyexit as ee
    >>> eem = ee.wrap(timm.create_model("resnet18").eval())
    >>> eem.predict(torch.randn(2, 3, 224, 224)).exit_index  # gates closed: the full model answers
    tensor([4, 4])
"""

from importlib.metadata import PackageNotFoundError, version

from . import evaluation
from .backbones import (
    BackboneAdapter,
    FeatureLayout,
    find_adapter,
    register_adapter,
    supported_families,
    unregister_adapter,
)
from .calibration import calibrate_joint, calibrate_risk_control, calibrate_thresholds
from .cartography import CartographyMeter, DataMap, DifficultyRouter
from .cascade import (
    Cascade,
    EarlyExitTier,
    EnsembleTier,
    LocalTier,
    RemoteTier,
)
from .costs.placement import Link, Site, StageProfile, evaluate_placement, optimise_placement
from .distill import DistillConfig, Handover, HeadChoice, HeadChooser, OnlineDistiller
from .errors import (
    BackgroundTrainingError,
    CheckpointError,
    ConfigError,
    EarlyExitError,
    FallbackError,
    InputError,
    MissingDemoPackageError,
    MissingPackageError,
    RemoteTierError,
    ShippedFileError,
    UnsupportedModelError,
    UntrustedPredictionError,
)
from .gates import (
    AgreementGate,
    EntropyGate,
    Gate,
    GateContext,
    GiniGate,
    LearnedGate,
    MarginGate,
    MaxSoftmaxGate,
    PatienceGate,
    all_gate_scores,
    fit_learned_gate,
    gate_names,
    gate_scores,
    make_gate,
    register_gate,
    stack_trace_logits,
    unregister_gate,
)
from .heads import ExitHead, HeadSpec, head_kinds, register_head, unregister_head
from .loading import load
from .model import EarlyExitModel, ExitPoint, ExitRecord, ExitResult, ExitTrace
from .supervisors import Supervisor, make_supervisor
from .wrapping import exit_candidates, wrap

try:
    __version__ = version("earlyexit")  # the one version, written in pyproject.toml
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AgreementGate",
    "BackboneAdapter",
    "BackgroundTrainingError",
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
    "EntropyGate",
    "ExitHead",
    "ExitPoint",
    "ExitRecord",
    "ExitResult",
    "ExitTrace",
    "FallbackError",
    "FeatureLayout",
    "Gate",
    "GateContext",
    "GiniGate",
    "Handover",
    "HeadChoice",
    "HeadChooser",
    "HeadSpec",
    "InputError",
    "LearnedGate",
    "Link",
    "LocalTier",
    "MarginGate",
    "MaxSoftmaxGate",
    "MissingDemoPackageError",
    "MissingPackageError",
    "OnlineDistiller",
    "PatienceGate",
    "RemoteTier",
    "RemoteTierError",
    "ShippedFileError",
    "Site",
    "StageProfile",
    "Supervisor",
    "UnsupportedModelError",
    "UntrustedPredictionError",
    "__version__",
    "all_gate_scores",
    "calibrate_joint",
    "calibrate_risk_control",
    "calibrate_thresholds",
    "evaluate_placement",
    "evaluation",
    "exit_candidates",
    "find_adapter",
    "fit_learned_gate",
    "gate_names",
    "gate_scores",
    "head_kinds",
    "load",
    "make_gate",
    "make_supervisor",
    "optimise_placement",
    "register_adapter",
    "register_gate",
    "register_head",
    "stack_trace_logits",
    "supported_families",
    "unregister_adapter",
    "unregister_gate",
    "unregister_head",
    "wrap",
]
