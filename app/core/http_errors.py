"""Exceptions as OpenAI error bodies, without a web framework: the core of the one error
mapper, shared by the API (:mod:`app.api.errors` adds the framework's own exceptions and
installs the handlers) and the serving plane (errors after the first byte of a stream).

- ``RealignError`` subclasses carry their own status and code (and ``retry_after``,
  ``param``, ``retryable`` when they have them);
- anything else is logged with a request id and answered with a generic 500 that
  carries the id and no internal text.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from app.core.errors import AuthenticationError, RealignError

# Errors of requests are logged under the API's logger, whichever plane answered.
log = logging.getLogger("app.api")

# OpenAI's ``error.type`` values by status; other 4xx are invalid requests, 5xx server errors.
_TYPES: dict[int, str] = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
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


@dataclass(frozen=True)
class MappedError:
    """What an exception becomes: a status, OpenAI's error body, response headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def map_error(exc: BaseException, *, where: str = "") -> MappedError:
    """Map a domain error or an unexpected exception (logged) to the error a client sees.

    Args:
        exc: what was raised.
        where: the request (method and path) or stream, for the log line.
    """
    if isinstance(exc, RealignError):
        return realign_error(exc)
    return unexpected_error(exc, where)


def realign_error(exc: RealignError) -> MappedError:
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


def unexpected_error(exc: BaseException, where: str) -> MappedError:
    request_id = f"req_{uuid.uuid4().hex[:20]}"
    log.error("unexpected error on %s, request id %s", where or "?", request_id, exc_info=exc)
    message = (
        f"The server hit an unexpected error; it has been logged with request id {request_id}."
    )
    body = error_body(500, message, code="internal_error")
    return MappedError(500, body, {"X-Request-Id": request_id})
