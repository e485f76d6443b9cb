"""The residual engine's verbs behind ``app.merge``, split by role: context (settings
and store handed down), residual (compute, apply), merged (merge to a directory),
stored (merge into the store, preflight), catalog (inspect, verify, ls, rm)."""
