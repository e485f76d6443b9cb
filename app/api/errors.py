"""The one place where exceptions become HTTP responses, always in OpenAI's error shape.

``RealignError`` subclasses carry their own status and code; request validation
errors are 422; framework ``HTTPException``s keep their status; anything else is
logged and answered with a bare 500 that leaks no internals.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.core.errors import AuthenticationError, RealignError

log = logging.getLogger("app.api")

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


def _location(loc: Sequence[Any]) -> str:
    # Drop the leading "body"/"query"/... so param names read like OpenAI's ("alpha").
    parts = [str(p) for p in loc[1:]] if len(loc) > 1 else [str(p) for p in loc]
    return ".".join(parts)


async def _realign_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RealignError)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthenticationError) else None
    retry_after = getattr(exc, "retry_after", None)  # e.g. a model that is still loading
    if retry_after is not None:
        headers = {"Retry-After": str(int(retry_after))}
    return error_response(exc.http_status, exc.message, code=exc.code, headers=headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors:
        return error_response(422, "Invalid request.", code="invalid_request")
    parts = [f"{_location(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    first = errors[0]
    code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_request"
    return error_response(
        422, "; ".join(parts) + more, code=code, param=_location(first.get("loc", ())) or None
    )


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    code = _CODES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_"))
    return error_response(status, message, code=code, headers=exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        500, "The server hit an unexpected error; it has been logged.", code="internal_error"
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the mapper on ``app``: the only exception handlers of the API."""
    app.add_exception_handler(RealignError, _realign_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
