"""Measurement: MACs, latency, metrics, sweeps, reports, plots, reference workloads."""
