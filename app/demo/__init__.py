"""Tiny but real Hugging Face checkpoints for tests, demos and benchmarks."""
