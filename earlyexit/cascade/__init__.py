"""Cascades of whole models (BiSupervised, cascade of ensembles): cheapest tier first.

* :mod:`.tiers`: what a tier is (a local model, an ensemble, a wrapped early-exit model);
* :mod:`.remote`: a tier behind an HTTP endpoint (``.npy`` in and out, per-call costs, timeouts);
* :mod:`.policy`: the :class:`Cascade` itself: serving, recording evidence, calibration, replay.
"""

from __future__ import annotations

from .policy import Cascade, CascadeRecord, CascadeStats
from .remote import RemoteTier, RemoteTierError
from .tiers import EarlyExitTier, EnsembleTier, LocalTier, Tier, TierOutput

__all__ = [
    "Cascade",
    "CascadeRecord",
    "CascadeStats",
    "EarlyExitTier",
    "EnsembleTier",
    "LocalTier",
    "RemoteTier",
    "RemoteTierError",
    "Tier",
    "TierOutput",
]
