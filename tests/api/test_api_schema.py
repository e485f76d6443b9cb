"""Property-based requests generated from our OpenAPI schema never get a 5xx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from app.api.app import create_app
from app.core.settings import Settings

HTTP_METHODS = {"get", "post", "put", "patch", "delete"}
# Building the app reads no environment beyond Settings and starts nothing (no lifespan).
_PATHS: dict[str, Any] = create_app(Settings(host="127.0.0.1", api_keys=None)).openapi()["paths"]
OPERATIONS = [(m, p) for p, ops in _PATHS.items() for m in ops if m in HTTP_METHODS]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory, sandbox: Path) -> Any:
    # Auth off (loopback): every generated request reaches the service, admin routes too.
    store = tmp_path_factory.mktemp("schema_store")
    app = create_app(Settings(models_cache_dir=store, allowed_roots=[sandbox]))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_server_errors(method: str, path: str, api_schema: Any) -> None:
    operation = api_schema[path][method.upper()]

    @given(case=operation.as_strategy())
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(checks=[not_a_server_error])

    check()
