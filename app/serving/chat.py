"""Chat and text completions over the engine pool, non-streamed and as SSE."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from app.core.errors import InvalidParameterError, RealignError
from app.core.http_errors import map_error
from app.engines.base import ChatEngine, GenerationRequest
from app.engines.pool import EnginePool
from app.engines.source import LocalModel
from app.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
)
from app.serving.tokens import Detokenizer, ServedTokenizer

DEFAULT_MAX_TOKENS = 256
TokenizerLookup = Any  # Callable[[str], ServedTokenizer], raising JobNotFound-like errors


@dataclass
class _Choice:
    detok: Detokenizer
    text: str = ""
    tokens: int = 0
    finish: str | None = None
    stop_reason: int | str | None = None  # vLLM's: a stop id other than eos, or the string


@dataclass
class _Run:
    """One request in flight: ids, per-choice text, usage."""

    kind: str  # "chat.completion" or "text_completion"
    model: str
    prompt_tokens: int
    choices: list[_Choice]
    local: LocalModel | None = None  # the weights its prompt was tokenized for
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> Usage:
        done = sum(c.tokens for c in self.choices)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=done,
            total_tokens=self.prompt_tokens + done,
        )


class ContextLengthError(RealignError):
    """Prompt plus requested tokens exceed what the engine accepts."""

    code = "context_length_exceeded"

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedParameterError(InvalidParameterError):
    """A request parameter has a value this server does not serve (OpenAI's 400)."""

    code = "unsupported_value"

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class ChatService:
    """OpenAI chat/completions on top of an :class:`EnginePool`.

    Args:
        pool: the engines.
        tokenizer_for: model id -> its :class:`ServedTokenizer` (raises for unknown ids).
        max_model_len: prompt + completion tokens an engine accepts, or model id -> that.
    """

    def __init__(
        self,
        pool: EnginePool,
        tokenizer_for: TokenizerLookup,
        max_model_len: int | Callable[[str], int] = 2048,
    ) -> None:
        self.pool = pool
        self.tokenizer_for = tokenizer_for
        self.max_model_len = max_model_len

    def _request(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        tok: ServedTokenizer,
        prompt: list[int],
        budget: int,
    ) -> GenerationRequest:
        limit = self.max_model_len
        limit = limit(body.model) if callable(limit) else limit
        if len(prompt) >= limit:
            what = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; this model accepts at most "
                f"{limit} tokens in total — shorten the {what}",
                param=what,
            )
        return GenerationRequest(
            prompt,
            max_tokens=min(budget, limit - len(prompt)),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            n=body.n,
            stop_token_ids=tok.stop_ids,
        )

    async def chat(self, body: ChatCompletionRequest) -> ChatCompletion | AsyncIterator[str]:
        tok: ServedTokenizer = self.tokenizer_for(body.model)
        local = self.pool.local(body.model)  # what tok belongs to (no await in between)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = tok.chat_prompt(messages)
        req = self._request(body, tok, prompt, body.token_budget(DEFAULT_MAX_TOKENS))
        run = _Run(
            "chat.completion",
            body.model,
            len(prompt),
            [_Choice(Detokenizer(tok, body.stops())) for _ in range(body.n)],
            local,
        )
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(run, req, usage)
        await self._drain(run, req)
        return ChatCompletion(
            id=run.id,
            created=run.created,
            model=run.model,
            usage=run.usage(),
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=c.text),
                    finish_reason=c.finish,
                    stop_reason=c.stop_reason,
                )
                for i, c in enumerate(run.choices)
            ],
        )

    async def complete(self, body: CompletionRequest) -> Completion | AsyncIterator[str]:
        tok: ServedTokenizer = self.tokenizer_for(body.model)
        local = self.pool.local(body.model)  # what tok belongs to (no await in between)
        prompts = body.prompts()
        if len(prompts) != 1:
            raise UnsupportedParameterError(
                f"'prompt' holds {len(prompts)} prompts; this server takes one prompt per "
                "request — send several requests",
                param="prompt",
            )
        prompt = tok.encode(prompts[0])
        req = self._request(body, tok, prompt, body.max_tokens or 16)
        run = _Run(
            "text_completion",
            body.model,
            len(prompt),
            [_Choice(Detokenizer(tok, body.stops())) for _ in range(body.n)],
            local,
        )
        run.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(run, req, usage)
        await self._drain(run, req)
        echo = prompts[0] if body.echo else ""
        return Completion(
            id=run.id,
            created=run.created,
            model=run.model,
            usage=run.usage(),
            choices=[
                CompletionChoice(
                    index=i, text=echo + c.text, finish_reason=c.finish, stop_reason=c.stop_reason
                )
                for i, c in enumerate(run.choices)
            ],
        )

    async def _deltas(
        self, run: _Run, req: GenerationRequest, engine: ChatEngine
    ) -> AsyncGenerator[tuple[int, str, str | None], None]:
        """(choice index, new text, finish reason) as tokens arrive."""
        async with contextlib.aclosing(engine.generate(req)) as chunks:
            async for chunk in chunks:
                choice = run.choices[chunk.index]
                if choice.finish is not None:
                    continue
                stop_token = chunk.finish_reason == "stop"
                ids = chunk.token_ids[:-1] if stop_token else chunk.token_ids
                choice.tokens += len(chunk.token_ids)
                text = choice.detok.push(ids)
                finish = "stop" if choice.detok.stopped else chunk.finish_reason
                if choice.detok.stopped:
                    choice.stop_reason = choice.detok.matched
                elif stop_token and chunk.token_ids:
                    choice.stop_reason = _stop_reason(choice.detok.tok, chunk.token_ids[-1])
                choice.text += text
                choice.finish = finish
                yield chunk.index, text, finish

    async def _drain(self, run: _Run, req: GenerationRequest) -> None:
        async with (
            self.pool.use(run.model, run.local) as engine,
            contextlib.aclosing(self._deltas(run, req, engine)) as deltas,
        ):
            async for _ in deltas:
                pass

    async def _stream(self, run: _Run, req: GenerationRequest, usage: bool) -> AsyncIterator[str]:
        """The SSE events of ``run``, once its engine is held: a model that is loading,
        failed or busy past the wait is an HTTP error with its status (and Retry-After),
        not a ``200`` whose stream holds the error."""
        events = self._sse(run, req, usage)
        await anext(events)  # up to the engine: raises (and ends the generator) as use() does
        return events

    async def _sse(
        self, run: _Run, req: GenerationRequest, usage: bool
    ) -> AsyncGenerator[str, None]:
        """Server-sent events, after one empty item once the engine is held (see
        :meth:`_stream`); errors after the first byte become an error event. A client gone
        mid-stream cancels it, which lets the engine go; a generator dropped unread (the
        response never started) is closed by the event loop's finalizer, which does too."""
        chunk_kind = "chat.completion.chunk" if run.kind == "chat.completion" else run.kind
        head = {"id": run.id, "object": chunk_kind, "created": run.created, "model": run.model}
        async with self.pool.use(run.model, run.local) as engine:
            yield ""
            try:
                if run.kind == "chat.completion":
                    for i in range(len(run.choices)):
                        delta = {"role": "assistant", "content": ""}
                        yield _event({**head, "choices": [_streamed(i, {"delta": delta}, None)]})
                # closed before the engine goes back to the pool, however the stream ends
                async with contextlib.aclosing(self._deltas(run, req, engine)) as deltas:
                    async for index, text, finish in deltas:
                        if not text and finish is None:
                            continue
                        body = (
                            {"delta": {"content": text}}
                            if run.kind == "chat.completion"
                            else {"text": text}
                        )
                        yield _event({**head, "choices": [_streamed(index, body, finish)]})
                if usage:
                    yield _event({**head, "choices": [], "usage": run.usage().model_dump()})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the status line is sent: the error becomes an event
                where = f"{run.kind} stream {run.id} of {run.model!r}"
                yield _event(map_error(exc, where=where).body)
        yield "data: [DONE]\n\n"


def _streamed(index: int, body: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"index": index, **body, "finish_reason": finish, "logprobs": None}


def _stop_reason(tok: ServedTokenizer, token: int) -> int | None:
    """As vLLM reports it: None for the tokenizer's end-of-sequence token (the chat
    template's end of turn), else the id of the other stop token that ended the choice
    (e.g. a base model's end of text)."""
    return None if token == tok.tokenizer.eos_token_id else int(token)


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
