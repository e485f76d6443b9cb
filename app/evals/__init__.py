"""Evaluation: suites on lm-evaluation-harness, eval jobs, α sweeps and reports."""
