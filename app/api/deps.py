"""Typed dependencies: settings, the job service and the authenticated caller."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.auth import KeyRing
from app.core.errors import PermissionDeniedError
from app.core.settings import Settings
from app.handoff.requests import ReplicaRequests
from app.jobs.models import Caller
from app.jobs.service import JobService

if TYPE_CHECKING:  # the engines are imported only by a process that serves
    from app.serving.service import ServingService

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key from REALIGN_API_KEYS. Not needed when auth is off (loopback).",
)


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_service(request: Request) -> JobService:
    service: JobService = request.app.state.service
    return service


def get_serving(request: Request) -> ServingService:
    serving: ServingService = request.app.state.serving
    return serving


def get_requests(request: Request) -> ReplicaRequests:
    requests: ReplicaRequests = request.app.state.requests
    return requests


def get_caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    keyring: KeyRing = request.app.state.keyring
    return keyring.authenticate(credentials.credentials if credentials else None)


def require_admin(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
    if not caller.is_admin:
        raise PermissionDeniedError(f"API key {caller.name!r} is not an admin key.")
    return caller


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[JobService, Depends(get_service)]
RequestsDep = Annotated[ReplicaRequests, Depends(get_requests)]
if TYPE_CHECKING:
    ServingDep = Annotated[ServingService, Depends(get_serving)]
else:  # the engines are not imported by the job plane: FastAPI needs no class here
    ServingDep = Annotated[Any, Depends(get_serving)]
CallerDep = Annotated[Caller, Depends(get_caller)]
AdminDep = Annotated[Caller, Depends(require_admin)]
