"""Realign: keep LLMs instruction-aligned while their knowledge moves."""

__version__ = "0.1.0"
