"""Request body limit as pure ASGI middleware.

A declared ``Content-Length`` above the limit is refused before the app runs; a
body without one (chunked) is counted while it streams in and cut off as soon as
it passes the limit, so no route ever buffers more than ``max_bytes``. Either way
the 413 carries ``Connection: close``: the server closes the connection after it
instead of reading (and discarding) the rest of an oversize upload.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` mid-stream; an ``HTTPException`` so FastAPI's body parsing
    passes it through to the error mapper (413) instead of calling it a parse error."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"Request body is larger than the limit of {limit} bytes.",
            headers={"Connection": "close"},  # stop reading: the server closes after the 413
        )


class BodyLimitMiddleware:
    """Answer 413 (OpenAI error shape) for request bodies above ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLargeError:
            # Only reached when no inner handler turned it into a response already.
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            f"Request body is larger than the limit of {self.max_bytes} bytes.",
            code="payload_too_large",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
