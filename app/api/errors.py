"""The one place where exceptions become HTTP responses, always in OpenAI's error shape.

Every handler of the API and every stream that fails after its first byte (chat SSE,
job events) goes through :func:`map_exception`, which adds the framework's exceptions to
the framework-free core in :mod:`app.core.http_errors` (shared with the serving plane):

- request validation errors are 400 ``invalid_request_error`` naming the ``param`` on
  the OpenAI routes (as OpenAI answers), 422 in the same shape on our own routes;
- framework ``HTTPException``s keep their status and headers;
- domain errors and unexpected ones as :func:`app.core.http_errors.map_error` maps them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.core.errors import RealignError
from app.core.http_errors import MappedError, error_body, error_type, map_error

__all__ = [
    "MappedError",
    "error_body",
    "error_response",
    "error_type",
    "install_error_handlers",
    "map_exception",
    "response",
]

# Routes that speak OpenAI's dialect: parameter errors there are 400, not 422.
OPENAI_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})

_CODES: dict[int, str] = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


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


def response(mapped: MappedError) -> JSONResponse:
    """The HTTP response of a mapped error."""
    return JSONResponse(mapped.body, status_code=mapped.status, headers=mapped.headers or None)


def map_exception(
    exc: BaseException, *, openai_route: bool = False, where: str = ""
) -> MappedError:
    """Map any exception to the error the client sees (logging unexpected ones).

    Args:
        exc: what was raised.
        openai_route: the request was for an OpenAI route (validation errors are 400).
        where: the request (method and path) or stream, for the log line.
    """
    if isinstance(exc, RequestValidationError):
        return _validation(exc, openai_route)
    if isinstance(exc, HTTPException):
        return _http(exc)
    return map_error(exc, where=where)


def _union_tag(part: object) -> bool:
    """A union member pydantic names in a location ("constrained-float", "AlphaSweep"):
    not a field the client wrote."""
    return isinstance(part, str) and ("-" in part or part[:1].isupper())


def _location(loc: Sequence[Any], openai_style: bool) -> str:
    # Drop the leading "body"/"query"/... so param names read like OpenAI's ("alpha").
    parts = list(loc[1:]) if len(loc) > 1 else list(loc)
    parts = [p for p in parts if not _union_tag(p)] or parts
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


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    path = request.url.path
    where = f"{request.method} {path}"
    return response(map_exception(exc, openai_route=path in OPENAI_ROUTES, where=where))


def install_error_handlers(app: FastAPI) -> None:
    """Register the mapper on ``app``: the only exception handlers of the API."""
    for kind in (RealignError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, _handle)
