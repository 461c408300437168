"""Measurement: MACs, latency, metrics, sweeps, reports, plots, reference workloads."""

from .macs import MacCounter, MacReport, count_macs, fvcore_macs

__all__ = ["MacCounter", "MacReport", "count_macs", "fvcore_macs"]
