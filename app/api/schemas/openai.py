"""OpenAI wire format: defined by the serving plane (:mod:`app.serving.protocol`), which
owns it; re-exported here for the routes that document it."""

from __future__ import annotations

from app.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    StreamOptions,
    TextPart,
    Usage,
)

__all__ = [
    "AssistantMessage",
    "ChatChoice",
    "ChatCompletion",
    "ChatCompletionRequest",
    "ChatMessage",
    "Completion",
    "CompletionChoice",
    "CompletionRequest",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "TextPart",
    "Usage",
]
