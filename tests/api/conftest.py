"""API fixtures: a real embedded JobService behind a real uvicorn, with and without keys."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.api.app import create_app
from app.api.auth import hash_key
from app.api.ratelimit import MemoryLimiter
from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from tests.api.live import LiveServer

# name -> (role, token); only the sha256 of each token reaches the settings.
KEYS = {
    "alice": ("user", "sk-test-alice-5b1f"),
    "bob": ("user", "sk-test-bob-93c2"),
    "root": ("admin", "sk-test-root-0d7e"),
}


def api_keys_json() -> str:
    return json.dumps(
        [{"name": n, "role": role, "sha256": hash_key(token)} for n, (role, token) in KEYS.items()]
    )


@pytest.fixture(autouse=True, scope="module")
def _hub_offline() -> Iterator[None]:
    """No test of the API may reach the Hugging Face Hub, whatever a body names."""
    import huggingface_hub.constants as hub

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(hub, "HF_HUB_OFFLINE", True)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory, llama_triple: TinyTriple) -> Path:
    """An allowed root holding a symlink that escapes it (to a real model outside)."""
    root = tmp_path_factory.mktemp("sandbox")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(llama_triple.base, outside / "model")
    (root / "escape").symlink_to(outside / "model", target_is_directory=True)
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="session")
def api_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api_store")


@pytest.fixture(scope="session")
def api_settings(
    api_store: Path, sandbox: Path, llama_triple: TinyTriple, qwen_triple: TinyTriple
) -> Settings:
    roots = [llama_triple.base.parent, qwen_triple.base.parent, sandbox]
    return Settings(models_cache_dir=api_store, allowed_roots=roots, api_keys=api_keys_json())


@pytest.fixture(scope="session")
def live(api_settings: Settings) -> Iterator[LiveServer]:
    """The API with keys (alice, bob: users; root: admin) on a real port."""
    with LiveServer(create_app(api_settings)) as server:
        yield server


@pytest.fixture(autouse=True, scope="module")
def _fresh_rate_window(request: pytest.FixtureRequest) -> None:
    """One server serves every module here under the default per-key rate limits: each
    module's callers start with a fresh window, as separate clients' runs would."""
    live: LiveServer = request.getfixturevalue("live")
    limiter = live.app.state.limiter
    if isinstance(limiter, MemoryLimiter):
        limiter.forget()


def _client(live: LiveServer, name: str | None) -> Iterator[httpx.Client]:
    with live.client(KEYS[name][1] if name else None) as client:
        yield client


@pytest.fixture(scope="session")
def alice(live: LiveServer) -> Iterator[httpx.Client]:
    yield from _client(live, "alice")


@pytest.fixture(scope="session")
def bob(live: LiveServer) -> Iterator[httpx.Client]:
    yield from _client(live, "bob")


@pytest.fixture(scope="session")
def root(live: LiveServer) -> Iterator[httpx.Client]:
    yield from _client(live, "root")


@pytest.fixture(scope="session")
def anon(live: LiveServer) -> Iterator[httpx.Client]:
    yield from _client(live, None)
