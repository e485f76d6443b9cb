"""Per-key rate and concurrency limits as pure ASGI middleware.

Each request is counted against its caller (the API key's name, or the client address
when auth is off or the key is unknown) in one of three buckets with their own
limits: ``chat`` (chat and text completions), ``merge`` (job submissions) and ``api``
(everything else; health and metrics are exempt). A request over a limit gets 429 in
OpenAI's error shape with ``Retry-After`` before its body is read; other callers are
not affected. Being ASGI middleware, a concurrency slot is held until a streamed
response (chat SSE, job events) has finished.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.auth import KeyRing
from app.api.errors import error_response
from app.api.ratelimit import Limiter, MemoryLimiter, RedisLimiter
from app.core.errors import AuthenticationError
from app.core.settings import Settings

log = logging.getLogger("app.api")

_EXEMPT = ("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json")
_CHAT = frozenset({"/v1/chat/completions", "/v1/completions"})
_SUBMIT = frozenset({"/merge", "/v1/merges", "/v1/residuals", "/v1/evals"})


@dataclass(frozen=True)
class Limit:
    """One bucket's limits per caller; 0 = no limit. ``setting`` names them for messages."""

    rpm: int
    concurrent: int
    setting: str


def limits_from(settings: Settings) -> dict[str, Limit]:
    return {
        "chat": Limit(settings.rate_limit_chat_rpm, settings.concurrency_chat, "CHAT"),
        "merge": Limit(settings.rate_limit_merge_rpm, settings.concurrency_merge, "MERGE"),
        "api": Limit(settings.rate_limit_api_rpm, settings.concurrency_api, "API"),
    }


def make_limiter(settings: Settings) -> Limiter:
    """Redis-backed when Redis is configured (counts shared by every API process)."""
    if settings.redis_url:
        return RedisLimiter(settings.redis_url, settings.concurrency_slot_ttl_s)
    return MemoryLimiter()


def bucket_of(method: str, path: str) -> str | None:
    path = path.rstrip("/") or "/"
    if path.startswith(_EXEMPT) or path == "/admin" or path.startswith("/admin/assets/"):
        return None
    if method == "POST" and path in _CHAT:
        return "chat"
    if method == "POST" and path in _SUBMIT:
        return "merge"
    return "api"


class ThrottleMiddleware:
    """Answer 429 to a caller over its rate or concurrency limit."""

    def __init__(
        self, app: ASGIApp, limiter: Limiter, keyring: KeyRing, limits: dict[str, Limit]
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.keyring = keyring
        self.limits = limits
        self._warned = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        bucket = bucket_of(scope["method"], scope["path"]) if scope["type"] == "http" else None
        limit = self.limits.get(bucket or "")
        if bucket is None or limit is None or not (limit.rpm or limit.concurrent):
            await self.app(scope, receive, send)
            return
        ident, who = self._caller(scope)
        token = uuid.uuid4().hex
        try:
            refused = await self._admit(bucket, ident, who, limit, token)
        except Exception as exc:  # a limiter outage must not take the API down
            self._warn(exc)
            await self.app(scope, receive, send)
            return
        if refused is not None:
            message, code, retry = refused
            response = error_response(429, message, code=code, headers={"Retry-After": retry})
            await response(scope, receive, send)
            return
        if not limit.concurrent:
            await self.app(scope, receive, send)
            return
        try:
            await self._run_holding(bucket, ident, token, scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self.limiter.release(bucket, ident, token)
                except Exception as exc:  # the slot's TTL frees it
                    self._warn(exc)

    async def _admit(
        self, bucket: str, ident: str, who: str, limit: Limit, token: str
    ) -> tuple[str, str, str] | None:
        """None when admitted (holding a slot if concurrency is limited), else the 429."""
        if limit.rpm:
            wait = await self.limiter.hit(bucket, ident, limit.rpm)
            if wait is not None:
                return (
                    f"{who} sent more than {limit.rpm} {bucket} requests in the last minute "
                    f"(REALIGN_RATE_LIMIT_{limit.setting}_RPM); retry after {wait} s.",
                    "rate_limit_exceeded",
                    str(wait),
                )
        if limit.concurrent and not await self.limiter.acquire(
            bucket, ident, limit.concurrent, token
        ):
            return (
                f"{who} already has {limit.concurrent} {bucket} requests in flight "
                f"(REALIGN_CONCURRENCY_{limit.setting}); retry when one has finished.",
                "concurrency_limit_exceeded",
                "1",
            )
        return None

    async def _run_holding(
        self, bucket: str, ident: str, token: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Run the request; keep its Redis slot alive while it runs."""
        every = self.limiter.refresh_every
        if every is None:
            await self.app(scope, receive, send)
            return

        async def keep_alive() -> None:
            while True:
                await anyio.sleep(every)
                try:
                    await self.limiter.refresh(bucket, ident, token)
                except Exception as exc:
                    self._warn(exc)

        async with anyio.create_task_group() as group:
            group.start_soon(keep_alive)
            try:
                await self.app(scope, receive, send)
            finally:
                group.cancel_scope.cancel()

    def _caller(self, scope: Scope) -> tuple[str, str]:
        """(counting identity, how messages name it): the key's name, else the address."""
        if self.keyring.enabled:
            token = _bearer(scope)
            try:
                caller = self.keyring.authenticate(token) if token else None
            except AuthenticationError:
                caller = None  # the route answers 401; count it by address meanwhile
            if caller is not None:
                return f"key:{caller.name}", f"API key {caller.name!r}"
        client = scope.get("client")
        address = str(client[0]) if client else "unknown"
        return f"addr:{address}", f"Client {address}"

    def _warn(self, exc: Exception) -> None:
        if time.monotonic() - self._warned > 30:  # once per 30 s, not once per request
            self._warned = time.monotonic()
            log.warning("rate limiter unavailable, requests pass unlimited: %r", exc)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None
