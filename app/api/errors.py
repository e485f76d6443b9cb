"""The one place where exceptions become error bodies, always in OpenAI's error shape.

Every handler of the API and every stream that fails after its first byte (chat SSE,
job events) goes through :func:`map_exception`:

- ``RealignError`` subclasses carry their own status and code (and ``retry_after``,
  ``param``, ``retryable`` when they have them);
- request validation errors are 400 ``invalid_request_error`` naming the ``param`` on
  the OpenAI routes (as OpenAI answers), 422 in the same shape on our own routes;
- framework ``HTTPException``s keep their status and headers;
- anything else is logged with a request id and answered with a generic 500 that
  carries the id and no internal text.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.core.errors import AuthenticationError, RealignError

log = logging.getLogger("app.api")

# Routes that speak OpenAI's dialect: parameter errors there are 400, not 422.
OPENAI_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})

# OpenAI's ``error.type`` values by status; other 4xx are invalid requests, 5xx server errors.
_TYPES: dict[int, str] = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}
_CODES: dict[int, str] = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


def error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The ``{"error": {...}}`` body of a response with ``status``."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, code=code, param=param),
        status_code=status,
        headers=dict(headers) if headers else None,
    )


@dataclass(frozen=True)
class MappedError:
    """What an exception becomes: a status, OpenAI's error body, response headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers or None)


def map_exception(
    exc: BaseException, *, openai_route: bool = False, where: str = ""
) -> MappedError:
    """Map any exception to the error the client sees (logging unexpected ones).

    Args:
        exc: what was raised.
        openai_route: the request was for an OpenAI route (validation errors are 400).
        where: the request (method and path) or stream, for the log line.
    """
    if isinstance(exc, RealignError):
        return _realign(exc)
    if isinstance(exc, RequestValidationError):
        return _validation(exc, openai_route)
    if isinstance(exc, HTTPException):
        return _http(exc)
    return _unexpected(exc, where)


def _realign(exc: RealignError) -> MappedError:
    headers: dict[str, str] = {}
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    retry_after = getattr(exc, "retry_after", None)  # a loading model, a rate limit
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    if getattr(exc, "retryable", True) is False:
        headers["x-should-retry"] = "false"  # honoured by OpenAI's SDKs
    param = getattr(exc, "param", None)
    body = error_body(exc.http_status, exc.message, code=exc.code, param=param)
    return MappedError(exc.http_status, body, headers)


def _location(loc: Sequence[Any], openai_style: bool) -> str:
    # Drop the leading "body"/"query"/... so param names read like OpenAI's ("alpha").
    parts = list(loc[1:]) if len(loc) > 1 else list(loc)
    if not openai_style:
        return ".".join(str(p) for p in parts)
    text = ""
    for p in parts:  # OpenAI writes "messages[0].role"
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text


def _validation(exc: RequestValidationError, openai_route: bool) -> MappedError:
    status = 400 if openai_route else 422
    errors = list(exc.errors())
    if not errors:
        return MappedError(status, error_body(status, "Invalid request.", code="invalid_request"))
    locs = [_location(e.get("loc", ()), openai_route) for e in errors]
    parts = [f"{loc}: {e.get('msg', 'invalid')}" for loc, e in zip(locs, errors, strict=True)][:5]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    first = errors[0]
    if first.get("type") == "json_invalid":
        code = "invalid_json"
    elif not openai_route:
        code = "invalid_request"
    else:
        code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    param = locs[0] if locs[0] not in ("", "body") else None
    return MappedError(status, error_body(status, "; ".join(parts) + more, code=code, param=param))


def _http(exc: HTTPException) -> MappedError:
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    code = _CODES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_"))
    return MappedError(status, error_body(status, message, code=code), dict(exc.headers or {}))


def _unexpected(exc: BaseException, where: str) -> MappedError:
    request_id = f"req_{uuid.uuid4().hex[:20]}"
    log.error("unexpected error on %s, request id %s", where or "?", request_id, exc_info=exc)
    message = (
        f"The server hit an unexpected error; it has been logged with request id {request_id}."
    )
    body = error_body(500, message, code="internal_error")
    return MappedError(500, body, {"X-Request-Id": request_id})


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    path = request.url.path
    where = f"{request.method} {path}"
    return map_exception(exc, openai_route=path in OPENAI_ROUTES, where=where).response()


def install_error_handlers(app: FastAPI) -> None:
    """Register the mapper on ``app``: the only exception handlers of the API."""
    for kind in (RealignError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, _handle)
