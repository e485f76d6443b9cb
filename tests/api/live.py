"""A real uvicorn server in a thread, and small helpers for talking to it over HTTP."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from app.demo.tiny import TinyTriple

TERMINAL = {"succeeded", "failed", "cancelled"}


class LiveServer:
    """Serve ``app`` on a free loopback port (lifespan included) for the ``with`` block."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", ws="none")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def wait_for(client: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    """Poll ``GET /v1/merges/{id}`` until the job is terminal; return its last body."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/merges/{job_id}")
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        if job["status"] in TERMINAL:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']}"
        time.sleep(0.1)


def settle(admin: httpx.Client, timeout: float = 120) -> int:
    """Wait until no job is in flight; return the total number of jobs."""
    deadline = time.monotonic() + timeout
    while True:
        page = admin.get("/admin/jobs", params={"limit": 500}).json()
        if all(job["status"] in TERMINAL for job in page["data"]):
            return int(page["total"])
        assert time.monotonic() < deadline, "jobs still in flight"
        time.sleep(0.1)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response has ``status`` and OpenAI's error body (with ``code`` if given)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    if code is not None:
        assert error["code"] == code, error
    return error


def merge_body(triple: TinyTriple, **extra: object) -> dict[str, object]:
    """A ``MergeCreate`` body for a tiny triple: new_base + alpha * (instruct - base)."""
    body: dict[str, object] = {
        "target": str(triple.new_base),
        "base": str(triple.base),
        "instruct": str(triple.instruct),
    }
    return {**body, **extra}
