"""Across experiments: sweeps of many runs (Optuna) and the comparison of their results."""
