"""The FastAPI application factory, for one plane or both (``REALIGN_SERVE_ROLE``).

- ``api``: the job plane: merges, residuals, admin, health and metrics; no engines (the
  admin's engine routes ask the serving replicas, through the hand-off records).
- ``serving``: a serving replica: engines and the OpenAI routes, health and metrics.
- ``all``: both in one process (the single-box default).

Settings are read once and passed in; the job service and the serving service are built
and started in the lifespan (nothing heavy at import: the engines are imported only by
a process that serves). Only our routers are mounted, so the OpenAPI schema documents
exactly the public surface of the plane.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

import app as package
from app.api.auth import KeyRing, check_bind
from app.api.content import JsonBodyMiddleware
from app.api.errors import install_error_handlers
from app.api.limits import BodyLimitMiddleware
from app.api.metrics import metrics_registry
from app.api.routes import admin, evals, health, merges, models, openai, replicas, residuals
from app.api.throttle import ThrottleMiddleware, limits_from, make_limiter
from app.core.errors import InvalidSettingsError
from app.core.settings import Settings, get_settings
from app.handoff.requests import ReplicaRequests
from app.jobs.service import JobService

if TYPE_CHECKING:
    from app.serving.service import ServingService

DESCRIPTION = """\
Merge LLM checkpoints with instruction residuals:
`new = new_base + alpha * (instruct - base)`.

Jobs are queued and run by workers; follow them with `GET /v1/merges/{id}` or live
with `GET /v1/merges/{id}/events` (`Accept: text/event-stream`). Errors use OpenAI's
shape: `{"error": {"message", "type", "param", "code"}}`.

Authenticate with `Authorization: Bearer <API key>` unless auth is off (loopback only).
"""

TAGS = [
    {"name": "merges", "description": "Submit and follow merge jobs."},
    {"name": "evals", "description": "Evaluate served or merged models; HTML reports."},
    {"name": "residuals", "description": "Residual packs (instruct - base) in the store."},
    {"name": "admin", "description": "Every caller's jobs, workers, queues, store (admin keys)."},
    {"name": "openai", "description": "OpenAI-compatible chat, completions and models."},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
]


# Which routes each role answers; a gateway sends the OpenAI paths to serving, the rest
# to the API.
ROUTERS = {
    "all": (merges, evals, residuals, openai, models, admin, health),
    "api": (merges, evals, residuals, admin, replicas, health),
    "serving": (openai, models, health),
}


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    service: JobService | None = None
    serving: ServingService | None = None
    if settings.serve_role != "serving":
        service = JobService.from_settings(settings)
        service.start()
        app.state.readiness = service.readiness
        if settings.serve_role == "api":  # role all answers them from its own engines
            app.state.requests = _requests(settings, service)
    if settings.serve_role != "api":
        serving = _serving(settings, service)
        serving.start()
        if service is None:  # a serving replica: ready when it can read the catalog
            app.state.readiness = serving.readiness
    app.state.service, app.state.serving = service, serving
    app.state.metrics_registry = metrics_registry(service, serving)
    try:
        yield
    finally:
        if serving is not None:
            await serving.stop()
        if service is not None:
            service.stop()
        await app.state.limiter.close()


def _serving(settings: Settings, service: JobService | None) -> ServingService:
    """The engines of this process, reading the catalog the job service writes."""
    from app.handoff.board import LoadBoard
    from app.jobs.kv import RedisKV
    from app.serving.service import ServingService

    if service is not None:
        kv = service.records.kv
    else:
        assert settings.redis_url is not None  # checked in create_app
        kv = RedisKV(settings.redis_url)
    return ServingService(settings, LoadBoard(kv), role=settings.serve_role)


def _requests(settings: Settings, service: JobService) -> ReplicaRequests:
    """The admin's engine control of the job plane: asks every serving replica."""
    from app.handoff.bus import make_bus

    bus = make_bus(settings.redis_url)
    return ReplicaRequests(service.records.board, bus, settings.serve_load_timeout_s)


def _check_role(settings: Settings) -> None:
    if settings.serve_role != "all" and not settings.redis_url:
        raise InvalidSettingsError(
            f"REALIGN_SERVE_ROLE={settings.serve_role} needs REALIGN_REDIS_URL: the job plane "
            "and the serving plane meet through Redis; on one machine without Redis use the "
            "role all (the default)"
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings`` (the environment's when None).

    Raises:
        UnsafeSettingsError: no API keys on a non-loopback host, or malformed keys.
        InvalidSettingsError: the role api or serving without REALIGN_REDIS_URL.
    """
    settings = settings or get_settings()
    check_bind(settings)
    _check_role(settings)
    app = FastAPI(
        title="Realign",
        version=package.__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.keyring = KeyRing.from_settings(settings)
    install_error_handlers(app)
    # Added innermost first: the throttle sees every request before its body is read.
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.state.limiter = make_limiter(settings)
    app.add_middleware(
        ThrottleMiddleware,
        limiter=app.state.limiter,
        keyring=app.state.keyring,
        limits=limits_from(settings),
    )
    for module in ROUTERS[settings.serve_role]:
        app.include_router(module.router)
    return app
