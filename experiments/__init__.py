"""Experiment specs, the experiment tree and its lifecycle, workloads."""
