"""Content-addressed artifact store (residual packs, merged models)."""
