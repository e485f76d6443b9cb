"""Bad input is refused with OpenAI-shaped errors, and nothing is queued or stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from app.demo.tiny import TinyTriple
from tests.api.live import assert_error, merge_body, settle, wait_for
from tests.helpers import stored

LIMIT = 64 * 1024  # Settings.max_body_bytes default


@contextmanager
def nothing_queued_or_stored(root: httpx.Client, store: Path) -> Iterator[None]:
    before = settle(root), stored(store)
    yield
    assert (settle(root), stored(store)) == before


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b'{"target": "/x", "base": ', None),
        (b"[1, 2]", None),
        (b'{"target": "/x", "base": "/y", "instruct": "/z", "alpha": "much"}', "alpha"),
        (b'{"target": "/x", "base": "/y", "instruct": "/z", "alpha": 11}', "alpha"),
        (b'{"target": "/x", "base": "/y", "instruct": "/z", "dtype": "int2"}', "dtype"),
        (b'{"target": "/x", "base": "/y", "instruct": "/z", "surprise": 1}', "surprise"),
        (b'{"target": "/x", "base": "/y"}', None),
        (b'{"target": "/x", "residual": "abcdef", "base": "/y"}', None),
        (b'{"target": "~root/m", "base": "/y", "instruct": "/z"}', "target"),
        (b'{"target": "/x", "base": "/y\\u0000", "instruct": "/z"}', "base"),
    ],
)
def test_malformed_bodies_are_422(
    content: bytes, param: str | None, alice: httpx.Client, root: httpx.Client, api_store: Path
) -> None:
    with nothing_queued_or_stored(root, api_store):
        response = alice.post(
            "/v1/merges", content=content, headers={"Content-Type": "application/json"}
        )
        error = assert_error(response, 422)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    if content.endswith(b": "):
        assert error["code"] == "invalid_json"


def test_unknown_refs_are_refused(
    alice: httpx.Client,
    root: httpx.Client,
    api_store: Path,
    sandbox: Path,
    llama_triple: TinyTriple,
) -> None:
    with nothing_queued_or_stored(root, api_store):
        missing = merge_body(llama_triple, target=str(sandbox / "no-such-model"))
        assert_error(alice.post("/v1/merges", json=missing), 404, "model_not_found")
        gs = merge_body(llama_triple, base="gs://bucket/model")  # s3:// is supported
        assert "gs://" in assert_error(alice.post("/v1/merges", json=gs), 400)["message"]
        hub = merge_body(llama_triple, instruct="hf:not a repo")
        assert_error(alice.post("/v1/merges", json=hub), 400, "invalid_model_ref")
        residual = {"target": str(llama_triple.new_base), "residual": "abcdef0123"}
        assert_error(alice.post("/v1/merges", json=residual), 404, "artifact_not_found")
        assert_error(alice.get("/v1/residuals/abcdef0123"), 404, "artifact_not_found")
        assert_error(alice.get("/v1/residuals/..%2F..%2Fetc"), 404)  # no such route
        assert_error(alice.get("/v1/residuals/....etc"), 422)  # not a key


def test_paths_outside_allowed_roots_are_403(
    alice: httpx.Client,
    root: httpx.Client,
    api_store: Path,
    sandbox: Path,
    llama_triple: TinyTriple,
) -> None:
    outside = sandbox.parent / "outside0" / "model"
    assert outside.is_dir()  # a real model: only the root check can refuse it
    attempts = [
        merge_body(llama_triple, target=f"{sandbox}/../{outside.parent.name}/model"),
        merge_body(llama_triple, base=str(sandbox / "escape")),  # symlink out of the root
        merge_body(llama_triple, instruct=str(outside)),
        merge_body(llama_triple, target="/etc"),
    ]
    with nothing_queued_or_stored(root, api_store):
        for body in attempts:
            error = assert_error(alice.post("/v1/merges", json=body), 403, "path_not_allowed")
            assert "allowed" in error["message"]
        residual = {"base": str(sandbox / "escape"), "instruct": str(llama_triple.instruct)}
        assert_error(alice.post("/v1/residuals", json=residual), 403, "path_not_allowed")


def test_cross_family_fails_with_the_preflight_message(
    alice: httpx.Client, api_store: Path, llama_triple: TinyTriple, qwen_triple: TinyTriple
) -> None:
    before = stored(api_store)
    body = merge_body(llama_triple, target=str(qwen_triple.new_base))
    response = alice.post("/v1/merges", json=body)
    if response.status_code == 202:  # preflight runs on a worker: the job fails there
        job = wait_for(alice, response.json()["id"])
        assert job["status"] == "failed"
        error = job["error"]
    else:
        error = assert_error(response, 400)
    assert error["code"] == "incompatible_models"
    assert "qwen2" in error["message"] and "llama" in error["message"]
    assert stored(api_store) == before


def _chunks(total: int, size: int = 8192) -> Iterator[bytes]:
    yield b'{"target": "/x", "base": "/y", "instruct": "/z", "metadata": {"pad": "'
    for _ in range(total // size):
        yield b"a" * size
    yield b'"}}'


def test_oversize_bodies_are_413_with_and_without_content_length(
    alice: httpx.Client, root: httpx.Client, api_store: Path
) -> None:
    with nothing_queued_or_stored(root, api_store):
        sized = json.dumps({"target": "/x", "metadata": {"pad": "a" * (LIMIT + 1)}})
        response = alice.post(
            "/v1/merges", content=sized, headers={"Content-Type": "application/json"}
        )
        assert int(response.request.headers["content-length"]) > LIMIT
        assert_error(response, 413, "payload_too_large")

        chunked = alice.post(
            "/v1/merges",
            content=_chunks(4 * LIMIT),
            headers={"Content-Type": "application/json"},
        )
        assert "content-length" not in chunked.request.headers
        assert chunked.request.headers["transfer-encoding"] == "chunked"
        assert_error(chunked, 413, "payload_too_large")
    assert alice.get("/healthz").status_code == 200  # the server is still fine
