"""Cost counting: MACs of any module (:mod:`.macs`) and the cost and latency of running a model's
stages on a chain of sites with transfers between them (:mod:`.placement`)."""

from __future__ import annotations

from .macs import MacCounter, MacReport, count_macs, fvcore_macs
from .placement import (
    Link,
    PlacementReport,
    Site,
    StageProfile,
    evaluate_placement,
    optimise_placement,
)

__all__ = [
    "Link",
    "MacCounter",
    "MacReport",
    "PlacementReport",
    "Site",
    "StageProfile",
    "count_macs",
    "evaluate_placement",
    "fvcore_macs",
    "optimise_placement",
]
