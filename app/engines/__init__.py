"""Inference engines behind one protocol: vLLM (GPU or its CPU build) and transformers (CPU)."""
