"""The FastAPI application factory.

Settings are read once and passed in; the job service is built and started in the
lifespan (nothing heavy at import). Only our routers are mounted, so the OpenAPI
schema documents exactly the public surface.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import app as package
from app.api.auth import KeyRing, check_bind
from app.api.content import JsonBodyMiddleware
from app.api.errors import install_error_handlers
from app.api.limits import BodyLimitMiddleware
from app.api.metrics import metrics_registry
from app.api.routes import admin, health, merges, models, openai, residuals
from app.api.throttle import ThrottleMiddleware, limits_from, make_limiter
from app.core.settings import Settings, get_settings
from app.jobs.service import JobService
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
    {"name": "residuals", "description": "Residual packs (instruct - base) in the store."},
    {"name": "admin", "description": "Every caller's jobs, workers, queues, store (admin keys)."},
    {"name": "openai", "description": "OpenAI-compatible chat, completions and models."},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    service = JobService.from_settings(app.state.settings)
    service.start()
    app.state.service = service
    app.state.metrics_registry = metrics_registry(service)
    serving = ServingService(app.state.settings, service.records)
    serving.start()
    app.state.serving = serving
    try:
        yield
    finally:
        await serving.stop()
        service.stop()
        await app.state.limiter.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings`` (the environment's when None).

    Raises:
        UnsafeSettingsError: no API keys on a non-loopback host, or malformed keys.
    """
    settings = settings or get_settings()
    check_bind(settings)
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
    for module in (merges, residuals, openai, models, admin, health):
        app.include_router(module.router)
    return app
