"""Evaluation: suites on lm-evaluation-harness, eval jobs, alpha sweeps and reports."""
