"""API keys: 401 without or with a wrong key, 403 for users on admin routes, private jobs."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from app.api.app import create_app
from app.api.auth import KeyRing, check_bind, hash_key
from app.core.errors import AuthenticationError, UnsafeSettingsError
from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from tests.api.conftest import api_keys_json
from tests.api.live import LiveServer, assert_error, merge_body, wait_for

ADMIN_GETS = ["/admin/jobs", "/admin/workers", "/admin/queue", "/admin/store", "/metrics"]


def test_missing_or_wrong_key_is_401(anon: httpx.Client, live: LiveServer) -> None:
    response = anon.get("/v1/merges")
    assert assert_error(response, 401, "invalid_api_key")["type"] == "authentication_error"
    assert response.headers["www-authenticate"] == "Bearer"
    with live.client("sk-not-a-key") as wrong:
        assert_error(wrong.get("/v1/merges"), 401, "invalid_api_key")
        assert_error(wrong.get("/admin/jobs"), 401, "invalid_api_key")
    basic = anon.get("/v1/merges", headers={"Authorization": "Basic YWxpY2U6eA=="})
    assert_error(basic, 401, "invalid_api_key")


@pytest.mark.parametrize("path", ADMIN_GETS)
def test_admin_routes_need_an_admin_key(
    path: str, alice: httpx.Client, root: httpx.Client, anon: httpx.Client
) -> None:
    assert_error(anon.get(path), 401)
    error = assert_error(alice.get(path), 403, "permission_denied")
    assert error["type"] == "permission_error"
    assert root.get(path).status_code == 200


def test_a_user_cannot_see_another_users_job(
    alice: httpx.Client, bob: httpx.Client, root: httpx.Client, llama_triple: TinyTriple
) -> None:
    job = alice.post("/v1/merges", json=merge_body(llama_triple, alpha=0.3)).json()
    for response in (
        bob.get(f"/v1/merges/{job['id']}"),
        bob.get(f"/v1/merges/{job['id']}/events"),
        bob.get(f"/v1/merges/{job['id']}/events", headers={"Accept": "text/event-stream"}),
        bob.post(f"/v1/merges/{job['id']}/cancel"),
    ):
        assert_error(response, 404, "job_not_found")
    assert root.get(f"/v1/merges/{job['id']}").json()["owner"] == "alice"
    wait_for(alice, job["id"])
    everyone = root.get("/admin/jobs", params={"limit": 500}).json()["data"]
    assert job["id"] in {j["id"] for j in everyone}


def test_only_admins_delete_residuals(
    alice: httpx.Client, root: httpx.Client, llama_triple: TinyTriple
) -> None:
    job = alice.post("/v1/merges", json=merge_body(llama_triple, alpha=0.9)).json()
    key = wait_for(alice, job["id"])["result"]["residual_key"]
    assert_error(alice.delete(f"/v1/residuals/{key}"), 403, "permission_denied")
    assert alice.get(f"/v1/residuals/{key}").status_code == 200


def test_probes_need_no_key(anon: httpx.Client) -> None:
    assert anon.get("/healthz").json()["status"] == "ok"
    ready = anon.get("/readyz")
    assert ready.status_code == 200 and ready.json()["detail"] == "ready"


def test_keys_are_compared_by_digest() -> None:
    ring = KeyRing.from_settings(Settings(api_keys=api_keys_json()))
    assert ring.enabled
    assert ring.authenticate("sk-test-root-0d7e").role == "admin"
    assert ring.authenticate("sk-test-alice-5b1f").name == "alice"
    for token in (None, "", "sk-test-root-0d7", hash_key("sk-test-root-0d7e")):
        with pytest.raises(AuthenticationError):
            ring.authenticate(token)


@pytest.mark.parametrize(
    "keys",
    [
        "not json",
        json.dumps({"name": "x"}),
        json.dumps([{"name": "x", "role": "root", "sha256": "0" * 64}]),
        json.dumps([{"name": "x", "sha256": "short"}]),
        json.dumps([{"name": "x", "sha256": "0" * 64}, {"name": "x", "sha256": "1" * 64}]),
    ],
)
def test_malformed_keys_fail_at_start_up(keys: str) -> None:
    with pytest.raises(UnsafeSettingsError):
        create_app(Settings(api_keys=keys))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_no_keys_only_on_loopback(host: str) -> None:
    with pytest.raises(UnsafeSettingsError, match="without API keys"):
        check_bind(Settings(host=host))
    with pytest.raises(UnsafeSettingsError):
        create_app(Settings(host=host))
    check_bind(Settings(host=host, api_keys=api_keys_json()))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_without_keys_is_allowed(
    host: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    monkeypatch.setattr(logging.getLogger("app"), "propagate", True)
    with caplog.at_level("WARNING", logger="app.api"):
        check_bind(Settings(host=host))
    assert "auth is off" in caplog.text


def test_auth_off_makes_every_caller_the_local_admin(tmp_path: Path) -> None:
    settings = Settings(models_cache_dir=tmp_path / "store", allowed_roots=[tmp_path])
    with LiveServer(create_app(settings)) as server, server.client() as client:
        jobs = client.get("/admin/jobs")
        assert jobs.status_code == 200 and jobs.json()["total"] == 0
        assert client.get("/v1/merges").status_code == 200
