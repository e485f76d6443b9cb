"""The engine protocol. The front end owns tokenizer and chat template; engines see
token ids in and produce token ids out, because vLLM keeps the tokenizer it started
with while weights (and instruct-side tokenizers) are swapped under it."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt, already tokenized by the front end."""

    prompt_token_ids: list[int]
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop_token_ids: list[int] = field(default_factory=list)
    request_id: str = ""


@dataclass(frozen=True)
class GenerationChunk:
    """New tokens of one choice; ``finish_reason`` is set on its last chunk
    (``stop`` = a stop token, ``length`` = max_tokens)."""

    index: int
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass(frozen=True)
class InlineMerge:
    """Weights to compute inside the engine: ``target + alpha * R`` streamed from a
    residual pack and a base checkpoint (see ``app.residuals.inline.stream_merged``)."""

    residual_dir: Path
    target_dir: Path
    alpha: float = 1.0


class ChatEngine(Protocol):
    """A loaded model that generates from token ids and can swap weights in place."""

    kind: str
    model_dir: Path
    architecture: str
    max_model_len: int  # context length it serves (prompt + completion tokens)

    async def start(self) -> None:
        """Load the model (may take seconds to minutes)."""

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream the choices' new tokens."""
        ...

    async def reload(self, model_dir: Path) -> None:
        """Swap in the weights of another checkpoint of the same architecture, in place."""

    async def reload_merged(self, merge: InlineMerge) -> None:
        """Swap in merged weights computed on the fly (no merged checkpoint on disk)."""

    async def probe(self, token_ids: list[int]) -> list[int]:
        """Greedy next-token ids for a short prompt: used to verify a swap."""
        ...

    async def close(self) -> None:
        """Free the engine's memory."""
