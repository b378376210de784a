"""Accuracy experiments: how faithfully the package reproduces the paper's findings, by training
and evaluating through ``python -m snca_ext.train`` (``python -m experiments.fidelity``). Timing
lives in ``benchmarks/``."""
