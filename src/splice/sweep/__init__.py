"""Hyperparameter sweeps over splice's knobs: a YAML search space, Optuna's samplers and pruners,
one child process per trial, and a report (results.csv, results.md, plots, the best adapter)."""
