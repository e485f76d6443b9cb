"""JSON bodies sent without ``Content-Type: application/json``.

``curl -d '{...}'`` labels its body ``application/x-www-form-urlencoded``, and some
clients send no type at all. Our JSON routes take no forms, so such a body is read
as JSON (a body that is not JSON then gets the usual ``invalid_json`` error); any
other declared type is left alone.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

JSON_ROUTES = frozenset(
    {"/merge", "/v1/merges", "/v1/residuals", "/v1/chat/completions", "/v1/completions"}
)
_READ_AS_JSON = {b"", b"application/x-www-form-urlencoded", b"text/plain"}


class JsonBodyMiddleware:
    """Relabel form-encoded or untyped POST bodies on :data:`JSON_ROUTES` as JSON."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].rstrip("/") in JSON_ROUTES
        ):
            scope = {**scope, "headers": _as_json(scope["headers"])}
        await self.app(scope, receive, send)


def _as_json(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k != b"content-type"]
    declared = [v for k, v in headers if k == b"content-type"]
    mime = declared[0].split(b";")[0].strip().lower() if declared else b""
    if mime not in _READ_AS_JSON:
        return headers
    return [*kept, (b"content-type", b"application/json")]
