"""Gates (supervisor 1 at each exit): a score per sample from a head's logits.

A sample leaves at exit ``i`` when ``gate.score(...) >= thresholds[i]``. Higher scores mean more
confident. Calibration only ever sees scores, so every gate is calibrated the same way.

One job per module:

* :mod:`~earlyexit.gates.scores`: the score functions (``max_softmax_score`` ...) and the one
  name -> function table of confidence scores, shared with the final supervisor;
* :mod:`~earlyexit.gates.base`: the :class:`Gate` interface, :class:`GateContext`, and the
  hand-made gates (score gates, :class:`AgreementGate`, :class:`PatienceGate`);
* :mod:`~earlyexit.gates.learned`: :class:`LearnedGate`, its features and
  :func:`fit_learned_gate`;
* :mod:`~earlyexit.gates.registry`: gates by name (:func:`make_gate`, :func:`register_gate`);
* :mod:`~earlyexit.gates.replay`: scoring recorded traffic offline (:func:`gate_scores`);
* :mod:`~earlyexit.gates.scripted`: :class:`ScriptedExitGate`, forced exit mixes for measurements.

Example:
    >>> import torch
    >>> make_gate("margin").score(torch.tensor([[2.0, 0.0]]), GateContext(0, torch.arange(1)))
    tensor([0.7616])
"""

from .base import (
    AgreementGate,
    EntropyGate,
    Gate,
    GateContext,
    GiniGate,
    MarginGate,
    MaxSoftmaxGate,
    PatienceGate,
    distrust_non_finite,
)
from .learned import AGREEMENT_FEATURES, LearnedGate, agreement_features, fit_learned_gate
from .registry import gate_names, make_gate, register_gate, unregister_gate
from .replay import all_gate_scores, gate_scores, stack_trace_logits
from .scores import (
    CONFIDENCE_SCORES,
    agreement_score,
    gini_score,
    margin_score,
    max_softmax_score,
    neg_entropy_score,
    patience_score,
)
from .scripted import ScriptedExitGate

__all__ = [
    "AGREEMENT_FEATURES",
    "CONFIDENCE_SCORES",
    "AgreementGate",
    "EntropyGate",
    "Gate",
    "GateContext",
    "GiniGate",
    "LearnedGate",
    "MarginGate",
    "MaxSoftmaxGate",
    "PatienceGate",
    "ScriptedExitGate",
    "agreement_features",
    "agreement_score",
    "all_gate_scores",
    "distrust_non_finite",
    "fit_learned_gate",
    "gate_names",
    "gate_scores",
    "gini_score",
    "make_gate",
    "margin_score",
    "max_softmax_score",
    "neg_entropy_score",
    "patience_score",
    "register_gate",
    "stack_trace_logits",
    "unregister_gate",
]
