"""Issue 8, point 7: per-key rate and concurrency limits (embedded and on a real Redis),
OpenAI's 400 for invalid parameters, and an oversize chunked upload cut off after its 413."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.api.app import create_app
from app.api.auth import hash_key
from app.core.settings import Settings
from tests.api.live import LiveServer, assert_error
from tests.jobs.conftest import ROOT, RedisServer, free_port

TOKENS = {"carol": "sk-limits-carol-71", "dave": "sk-limits-dave-42"}
CHAT = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}


def keys_json() -> str:
    entries = [{"name": n, "role": "user", "sha256": hash_key(t)} for n, t in TOKENS.items()]
    return json.dumps(entries)


def settings(store: Path, **extra: Any) -> Settings:
    no_limits: dict[str, Any] = {
        "rate_limit_chat_rpm": 0,
        "rate_limit_merge_rpm": 0,
        "rate_limit_api_rpm": 0,
        "concurrency_chat": 0,
        "concurrency_merge": 0,
        "concurrency_api": 0,
    }
    return Settings(models_cache_dir=store, api_keys=keys_json(), **{**no_limits, **extra})


@contextmanager
def serve(s: Settings) -> Iterator[LiveServer]:
    with LiveServer(create_app(s)) as live:
        yield live


def client(live: LiveServer, name: str | None, local: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {TOKENS[name]}"} if name else {}
    transport = httpx.HTTPTransport(local_address=local) if local else None
    return httpx.Client(base_url=live.url, headers=headers, timeout=30, transport=transport)


def hold(url: str, path: str, token: str) -> socket.socket:
    """Start a POST whose chunked body never ends: the request stays in flight."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    sock.sendall(head.encode() + b"1\r\n{\r\n")
    return sock


def saturate(
    url: str, path: str, token: str, n: int, probe: Callable[[], int]
) -> list[socket.socket]:
    """Hold ``n`` requests in flight until ``probe`` answers 429.

    A probe can race a held request that the server has not admitted yet and take its
    slot, and that held request then gets its own 429: it is sent again.
    """
    held = [hold(url, path, token) for _ in range(n)]
    deadline = time.monotonic() + 15
    while probe() != 429:
        assert time.monotonic() < deadline, "the held requests never filled the limit"
        for i, sock in enumerate(held):
            if _answered(sock):
                sock.close()
                held[i] = hold(url, path, token)
        time.sleep(0.05)
    return held


def _answered(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    finally:
        sock.settimeout(10)


def finish(sock: socket.socket) -> bytes:
    """End a held request's body (it is not valid JSON) and return the status line."""
    sock.sendall(b"0\r\n\r\n")
    data = sock.recv(65536)
    sock.close()
    return data.split(b"\r\n", 1)[0]


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def assert_429(response: httpx.Response, code: str) -> dict[str, Any]:
    error = assert_error(response, 429, code)
    assert error["type"] == "rate_limit_error"
    assert int(response.headers["Retry-After"]) >= 1
    return error


# -- rate ------------------------------------------------------------------------------------


def test_rate_limit_is_per_key_and_per_bucket(tmp_path: Path) -> None:
    with (
        serve(settings(tmp_path, rate_limit_chat_rpm=3)) as live,
        client(live, "carol") as carol,
        client(live, "dave") as dave,
    ):
        for _ in range(3):
            assert_error(carol.post("/v1/chat/completions", json=CHAT), 404)
        refused = carol.post("/v1/chat/completions", json=CHAT)
        message = assert_429(refused, "rate_limit_exceeded")["message"]
        assert "'carol'" in message and "REALIGN_RATE_LIMIT_CHAT_RPM" in message
        assert int(refused.headers["Retry-After"]) <= 120  # two windows at most
        assert_error(carol.post("/v1/completions", json={**CHAT, "prompt": "x"}), 429)
        # another key, and another bucket of the same key, are not affected
        assert_error(dave.post("/v1/chat/completions", json=CHAT), 404)
        assert carol.get("/v1/models").status_code == 200
        assert carol.get("/healthz").status_code == 200


def test_openai_sdk_sees_a_rate_limit_error(tmp_path: Path) -> None:
    with serve(settings(tmp_path, rate_limit_chat_rpm=1)) as live:
        sdk = openai.OpenAI(base_url=f"{live.url}/v1", api_key=TOKENS["carol"], max_retries=0)
        with pytest.raises(openai.NotFoundError):
            sdk.chat.completions.create(**CHAT)
        with pytest.raises(openai.RateLimitError) as exc:
            sdk.chat.completions.create(**CHAT)
        assert exc.value.code == "rate_limit_exceeded"


def test_without_auth_callers_count_per_address(tmp_path: Path) -> None:
    s = settings(tmp_path, rate_limit_chat_rpm=2).model_copy(update={"api_keys": None})
    with (
        serve(s) as live,
        client(live, None, "127.0.0.1") as one,
        client(live, None, "127.0.0.2") as two,
    ):
        for _ in range(2):
            assert_error(one.post("/v1/chat/completions", json=CHAT), 404)
        error = assert_429(one.post("/v1/chat/completions", json=CHAT), "rate_limit_exceeded")
        assert "127.0.0.1" in error["message"]
        assert_error(two.post("/v1/chat/completions", json=CHAT), 404)


# -- concurrency ---------------------------------------------------------------------------


def test_concurrency_limit_is_per_key(tmp_path: Path) -> None:
    with (
        serve(settings(tmp_path, concurrency_merge=2)) as live,
        client(live, "carol") as carol,
        client(live, "dave") as dave,
    ):
        probe = lambda: carol.post("/v1/merges", json={}).status_code  # noqa: E731
        held = saturate(live.url, "/v1/merges", TOKENS["carol"], 2, probe)
        error = assert_429(carol.post("/merge", json={}), "concurrency_limit_exceeded")
        assert "REALIGN_CONCURRENCY_MERGE" in error["message"]
        assert_error(dave.post("/v1/merges", json={}), 422)  # another key: unaffected
        assert carol.get("/v1/merges").status_code == 200  # another bucket: unaffected
        assert finish(held[0]).endswith(b"422 Unprocessable Entity")
        eventually(lambda: carol.post("/v1/merges", json={}).status_code == 422)
        finish(held[1])


# -- Redis-backed ------------------------------------------------------------------------


def test_redis_limits_are_shared_by_api_processes(
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    s = settings(tmp_path, redis_url=redis_server.url, rate_limit_chat_rpm=3, concurrency_merge=1)
    with (
        serve(s) as one,
        serve(s) as two,
        client(one, "carol") as a,
        client(two, "carol") as b,
        client(two, "dave") as d,
    ):
        assert_error(a.post("/v1/chat/completions", json=CHAT), 404)
        assert_error(a.post("/v1/chat/completions", json=CHAT), 404)
        assert_error(b.post("/v1/chat/completions", json=CHAT), 404)
        assert_429(b.post("/v1/chat/completions", json=CHAT), "rate_limit_exceeded")
        assert_429(a.post("/v1/chat/completions", json=CHAT), "rate_limit_exceeded")
        assert_error(d.post("/v1/chat/completions", json=CHAT), 404)
        probe = lambda: b.post("/v1/merges", json={}).status_code  # noqa: E731
        [held] = saturate(one.url, "/v1/merges", TOKENS["carol"], 1, probe)  # held on one
        assert_error(d.post("/v1/merges", json={}), 422)
        finish(held)
        eventually(lambda: b.post("/v1/merges", json={}).status_code == 422)


def test_a_killed_api_process_frees_its_slots(
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    """Slots of a SIGKILLed API process are taken until their TTL passes, then free."""
    ttl = 4.0  # refreshed every 1.3 s: a loaded machine may delay one refresh by seconds
    s = settings(
        tmp_path, redis_url=redis_server.url, concurrency_merge=2, concurrency_slot_ttl_s=ttl
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALIGN_")}
    env.update(
        REALIGN_REDIS_URL=redis_server.url,
        REALIGN_MODELS_CACHE_DIR=str(tmp_path / "other"),
        REALIGN_API_KEYS=keys_json(),
        REALIGN_CONCURRENCY_MERGE="2",
        REALIGN_CONCURRENCY_SLOT_TTL_S=str(ttl),
        PYTHONPATH=str(ROOT),
    )
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    quiet = subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=quiet, stderr=quiet)
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: _answers(url), timeout=60)
        with serve(s) as live, client(live, "carol") as carol:
            probe = lambda: carol.post("/v1/merges", json={}).status_code  # noqa: E731
            held = saturate(url, "/v1/merges", TOKENS["carol"], 2, probe)  # held by the child
            time.sleep(1.5 * ttl)  # the live process keeps refreshing its slots past the TTL
            assert_429(carol.post("/v1/merges", json={}), "concurrency_limit_exceeded")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            killed = time.monotonic()
            eventually(lambda: probe() == 422, 3 * ttl)
            assert time.monotonic() - killed <= 3 * ttl
        for sock in held:
            sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# -- OpenAI's 400 for invalid parameters -----------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/v1/chat/completions", {**CHAT, "temperature": 5}, "temperature", "invalid_value"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages", "invalid_value"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "invalid_value",
        ),
        ("/v1/chat/completions", {"messages": CHAT["messages"]}, "model", None),
        ("/v1/chat/completions", {**CHAT, "logprobs": True}, "logprobs", "invalid_value"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": -1}, "max_tokens", "invalid_value"),
        ("/v1/completions", {"model": "m", "prompt": "x", "n": 0}, "n", "invalid_value"),
        ("/v1/completions", {"model": "m"}, "prompt", "missing_required_parameter"),
    ],
)
def test_openai_routes_answer_400_naming_the_param(
    tmp_path: Path, path: str, body: dict[str, Any], param: str, code: str | None
) -> None:
    with serve(settings(tmp_path)) as live, client(live, "carol") as carol:
        error = assert_error(carol.post(path, json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == (code or "missing_required_parameter")


def test_openai_routes_invalid_json_and_our_routes_keep_422(tmp_path: Path) -> None:
    with serve(settings(tmp_path)) as live, client(live, "carol") as carol:
        bad = carol.post("/v1/chat/completions", content=b'{"model": ', headers=_JSON)
        assert assert_error(bad, 400, "invalid_json")["type"] == "invalid_request_error"
        ours = assert_error(carol.post("/v1/merges", json={"target": "/x"}), 422)
        assert ours["type"] == "invalid_request_error"
        sdk = openai.OpenAI(base_url=f"{live.url}/v1", api_key=TOKENS["carol"], max_retries=0)
        with pytest.raises(openai.BadRequestError) as exc:
            sdk.chat.completions.create(model="m", messages=[], top_p=0)  # type: ignore[arg-type]
        assert exc.value.param in ("messages", "top_p")


_JSON = {"Content-Type": "application/json"}


# -- an oversize chunked body --------------------------------------------------------------


def test_oversize_chunked_body_gets_413_and_the_connection_is_closed(tmp_path: Path) -> None:
    limit = 4096
    with serve(settings(tmp_path, max_body_bytes=limit)) as live:
        host, port = live.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=10)
        head = (
            f"POST /v1/merges HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
            f"{TOKENS['carol']}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"a" * 1024
        sock.sendall(head.encode() + b"".join(b"400\r\n" + chunk + b"\r\n" for _ in range(6)))
        # ...and never the last chunk.
        head_text, body = _read_response(sock)
        assert head_text.startswith(b"HTTP/1.1 413"), head_text
        assert b"connection: close" in head_text.lower()
        assert json.loads(body)["error"]["code"] == "payload_too_large"
        # The server closed its side: more of the upload is refused, not read and
        # discarded (a server that kept reading would take this for ever).
        deadline = time.monotonic() + 3
        with pytest.raises(OSError):
            while time.monotonic() < deadline:
                sock.sendall(b"400\r\n" + chunk + b"\r\n")
                time.sleep(0.01)
        sock.close()


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """The head and body of one response (by its Content-Length)."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, f"closed before a full response: {data!r}"
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        part = sock.recv(65536)
        assert part, "closed in the middle of the response body"
        body += part
    return head, body
