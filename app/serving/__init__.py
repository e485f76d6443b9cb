"""OpenAI wire format <-> engines: chat, completions, models, SSE."""
