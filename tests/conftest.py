"""Shared fixtures: tiny generated checkpoints and scratch directories."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.demo.tiny import TinyTriple, make_triple, write_model
from tests.hubserver import HubServer, start_hub_server
from tests.s3server import S3Server, start_s3_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests on machines without CUDA; every other marker always runs."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # the marker itself: keywords also hold directory names (a checkout in gpu/)
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llama_triple(tmp_path_factory: pytest.TempPathFactory) -> TinyTriple:
    """Llama base / instruct / new base, bfloat16, two shards each."""
    return make_triple(tmp_path_factory.mktemp("llama"), family="llama", shards=2)


@pytest.fixture(scope="session")
def qwen_triple(tmp_path_factory: pytest.TempPathFactory) -> TinyTriple:
    """Qwen2 base / instruct / new base (q/k/v biases), bfloat16, one file each."""
    return make_triple(tmp_path_factory.mktemp("qwen2"), family="qwen2", shards=1)


@pytest.fixture(scope="session")
def llama_triple_fp32(tmp_path_factory: pytest.TempPathFactory) -> TinyTriple:
    """Llama triple stored in float32."""
    return make_triple(tmp_path_factory.mktemp("llama_fp32"), dtype=torch.float32)


@pytest.fixture(scope="session")
def llama_triple_extra_vocab(tmp_path_factory: pytest.TempPathFactory) -> TinyTriple:
    """Llama triple whose instruct side adds three special tokens (three more rows)."""
    return make_triple(tmp_path_factory.mktemp("llama_extra"), extra_instruct_tokens=3)


@pytest.fixture(scope="session")
def llama_triple_tied(tmp_path_factory: pytest.TempPathFactory) -> TinyTriple:
    """Llama triple with tied input/output embeddings (no `lm_head.weight`)."""
    return make_triple(tmp_path_factory.mktemp("llama_tied"), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def llama_unrelated(llama_triple: TinyTriple) -> Path:
    """A Llama of `llama_triple`'s config and layout from another seed: it passes every
    header check but does not descend from the triple's base (next to the triple, so
    under the same allowed root)."""
    return write_model(llama_triple.base.parent / "unrelated", seed=8, shards=2)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """A fresh, empty directory for an artifact store."""
    path = tmp_path / "store"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 API server (moto, server mode) on loopback for the session; every test
    takes its own bucket."""
    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    """A new, empty bucket on the session's S3 server."""
    return s3_server.bucket()


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    """A Hub-compatible file server on loopback for the session (see tests/hubserver.py)."""
    server = start_hub_server()
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """The Hub client pointed at ``hub_server``, as ``HF_ENDPOINT`` points it at a mirror
    (read by the client at import, so set where the client keeps it)."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "ENDPOINT", hub_server.endpoint)
    template = hub_server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(hf, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    return hub_server
