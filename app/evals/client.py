"""lm-eval's OpenAI-compatible chat client, keeping each reply's ``finish_reason``.

lm-eval's ``local-chat-completions`` model sends ``num_concurrent`` requests at a time
and hands the tasks the reply text only; the format suite also needs to know whether
the reply ended on a stop token (``stop``) or ran out of budget (``length``). This
subclass returns each reply as a :class:`Reply` (a ``str`` that carries it) and counts
the replies for progress. Imported only by the evaluation child process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lm_eval.models.openai_completions import LocalChatCompletion


class Reply(str):
    """A reply's text, with how it ended as the server said.

    ``finish_reason``: ``stop`` or ``length`` (None when absent). ``stop_reason`` (vLLM's
    and Realign's extension): None when the reply ended on the tokenizer's end-of-sequence
    token, else the other stop token id or stop string; ``reports_stop`` says whether the
    server sent it at all (other servers may not).
    """

    finish_reason: str | None
    stop_reason: int | str | None
    reports_stop: bool

    def __new__(
        cls,
        text: str,
        finish_reason: str | None = None,
        stop_reason: int | str | None = None,
        reports_stop: bool = False,
    ) -> Reply:
        reply = super().__new__(cls, text)
        reply.finish_reason = finish_reason
        reply.stop_reason = stop_reason
        reply.reports_stop = reports_stop
        return reply

    @property
    def ended_turn(self) -> bool:
        """Ended on the end-of-sequence token: ``finish_reason`` ``stop`` and, where the
        server says, no other stop token or string."""
        if self.finish_reason != "stop":
            return False
        return not self.reports_stop or self.stop_reason is None


def chat_url(base_url: str) -> str:
    """The chat completions URL of a server root, a ``…/v1`` base or the full URL."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return f"{url}/chat/completions" if url.endswith("/v1") else f"{url}/v1/chat/completions"


class RealignChat(LocalChatCompletion):  # type: ignore[misc]
    """``local-chat-completions`` whose replies keep their finish reason.

    Args:
        base_url: the server (root, ``/v1`` or the chat completions URL).
        model: the served model id.
        api_key: sent as a bearer token when set.
        concurrency: requests in flight.
        max_tokens: reply budget when a task sets none.
        timeout: seconds one request may take.
        on_reply: called with the number of replies received so far.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        max_tokens: int = 128,
        timeout: float = 600,
        on_reply: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(
            base_url=chat_url(base_url),
            model=model,
            num_concurrent=concurrency,
            max_gen_toks=max_tokens,
            timeout=int(timeout),
            max_retries=2,
            tokenizer_backend=None,
            tokenized_requests=False,
            header={"Authorization": f"Bearer {api_key}"} if api_key else {},
        )
        self.replies = 0
        self.generation_s = 0.0  # wall time spent in generate_until
        self.on_reply = on_reply

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        """lm-eval's concurrent generation, timed (``generation_s``)."""
        started = time.perf_counter()
        try:
            return list(super().generate_until(requests, disable_tqdm=disable_tqdm))
        finally:
            self.generation_s += time.perf_counter() - started

    @property
    def requests_per_s(self) -> float | None:
        """Replies per second of generation wall time."""
        return self.replies / self.generation_s if self.generation_s > 0 else None

    def parse_generations(self, outputs: Any, **kwargs: Any) -> list[Reply | None]:
        """Each choice's content as a :class:`Reply` (None where a choice has none)."""
        replies: list[Reply | None] = []
        for out in outputs if isinstance(outputs, list) else [outputs]:
            choices = sorted(out.get("choices") or [], key=lambda c: c.get("index", 0))
            for choice in choices:
                content = (choice.get("message") or {}).get("content")
                ended = (
                    choice.get("finish_reason"),
                    choice.get("stop_reason"),
                    "stop_reason" in choice,
                )
                replies.append(None if content is None else Reply(content, *ended))
            if not choices:  # e.g. a content filter: an empty reply, as lm-eval's own
                replies.append(Reply(""))
        self.replies += len(replies)
        if self.on_reply is not None:
            self.on_reply(self.replies)
        return replies
