"""A loopback OpenAI-compatible endpoint for one model directory, for evaluation.

A directory that no server serves (a merged model, the base, the instruct model) gets
the serving plane's own parts: the engine the settings choose (vLLM's CPU build when
installed, else transformers), the :class:`~app.engines.pool.EnginePool`, the
:class:`~app.serving.chat.ChatService` (chat template, stop tokens, finish reasons)
and the API's OpenAI routes and error mapper. So a model is evaluated through exactly
the code that serves it, without the job plane, catalog or store a ``realign serve``
needs (those know merged models by store key, not arbitrary directories).

Several directories share the one engine (each swapped in on its first request, in
place when the shapes match). It runs in a child process (``python -m
app.evals.endpoint --port P --models JSON``): vLLM starts its engine processes from a
main module, and the engine's memory goes with the child. The child and the engine
processes it starts end with the process that started it, SIGKILLed included
(:mod:`app.core.lifeline`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from app.core import lifeline
from app.core.errors import ModelNotFoundError, OperationCancelledError, RealignError
from app.engines.base import InlineMerge
from app.evals.offline import offline_env

if TYPE_CHECKING:
    from fastapi import FastAPI

    from app.core.settings import Settings
    from app.serving.protocol import ChatCompletionRequest, CompletionRequest, ModelCard


class EndpointError(RealignError, RuntimeError):
    """The evaluation endpoint did not start; the message ends with its log."""

    code = "eval_endpoint_failed"
    http_status = 503


@dataclass(frozen=True)
class Served:
    """A directory the endpoint serves: its weights, and where its tokenizer, chat
    template and stop tokens come from (default: the weights' directory)."""

    model_dir: Path
    template_dir: Path | None = None
    inline: InlineMerge | None = None  # weights = model_dir + alpha x R, merged on load


class DirectoryServing:
    """What the OpenAI routes need (``chat``, ``complete``, ``models``, ``card``,
    ``entry``) for a few model directories, one engine among them: a model is loaded on
    its first request (or :meth:`load`), swapped in place into the engine when it has
    the shapes of the one there (the demo's four models, a sweep's merges).

    Args:
        settings: the engine settings (``REALIGN_ENGINE`` and friends).
        models: model id -> what to serve under it; the first is loaded at start.
    """

    def __init__(self, settings: Settings, models: dict[str, Served]) -> None:
        from app.engines.factory import factory_from_settings
        from app.engines.pool import EnginePool, ModelSource
        from app.engines.sizing import context_length
        from app.serving.chat import ChatService
        from app.serving.tokens import ServedTokenizer

        self.served = models
        self.pool = EnginePool(factory_from_settings(settings), 1, settings.engine_wait_s)
        self.sources = {i: ModelSource.at(i, m.model_dir, m.inline) for i, m in models.items()}
        self.tokenizers = {
            i: ServedTokenizer.load(m.template_dir or m.model_dir) for i, m in models.items()
        }
        self.limits = {
            i: context_length(m.model_dir, settings.engine_max_model_len) for i, m in models.items()
        }
        self.chat_service = ChatService(self.pool, self._tokenizer_for, self.limits.__getitem__)

    def _tokenizer_for(self, model_id: str) -> Any:
        return self.tokenizers[self.entry(model_id)]

    async def load(self, model_id: str) -> str:
        """Make ``model_id`` the engine's model (in place when shapes allow); returns how."""
        if self.pool.loaded().get(self.entry(model_id)) == "ready":
            return "already loaded"
        return await self.pool.load(self.sources[model_id])

    async def start(self) -> None:
        await self.load(next(iter(self.served)))

    async def stop(self) -> None:
        await self.pool.close()

    def entry(self, model_id: str) -> str:
        if model_id not in self.served:
            raise ModelNotFoundError(
                f"the model {model_id!r} does not exist; this endpoint serves "
                f"{', '.join(map(repr, self.served))}"
            )
        return model_id

    def card(self, model_id: str) -> ModelCard:
        from app.engines.pool import describe
        from app.serving.protocol import ModelCard

        state = self.pool.loaded().get(self.entry(model_id), "unloaded")
        engine = next((e["engine"] for e in describe(self.pool) if e["model"] == model_id), None)
        return ModelCard(
            id=model_id,
            created=int(time.time()),
            owned_by="realign",
            realign={
                "model_dir": str(self.served[model_id].model_dir),
                "state": state,
                "engine": engine,
            },
        )

    def models(self) -> list[ModelCard]:
        return [self.card(i) for i in self.served]

    async def chat(self, body: ChatCompletionRequest) -> Any:
        await self.load(body.model)
        return await self.chat_service.chat(body)

    async def complete(self, body: CompletionRequest) -> Any:
        await self.load(body.model)
        return await self.chat_service.complete(body)


def create_endpoint_app(serving: DirectoryServing) -> FastAPI:
    """The OpenAI routes on ``serving`` (its first model loaded before the first request),
    ``GET /healthz``, and ``POST /eval/load/{model_id}`` to swap a model in ahead of its
    requests (so its first replies are not timed with the swap)."""
    from fastapi import FastAPI

    from app.api.auth import KeyRing
    from app.api.errors import install_error_handlers
    from app.api.routes import openai

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await serving.start()
        try:
            yield
        finally:
            await serving.stop()

    async def load(model_id: str) -> dict[str, str]:
        return {"model": model_id, "how": await serving.load(model_id)}

    app = FastAPI(title="Realign evaluation endpoint", lifespan=lifespan)
    app.state.serving = serving
    app.state.keyring = KeyRing([])  # loopback only, for this evaluation
    install_error_handlers(app)
    app.include_router(openai.router)
    app.add_api_route("/healthz", lambda: {"status": "ok"}, methods=["GET"])
    app.add_api_route("/eval/load/{model_id}", load, methods=["POST"])
    return app


def served_ids(dirs: list[Path]) -> list[str]:
    """A distinct model id for each directory: its name in the ids' alphabet (``-2``,
    ``-3``… on repeats)."""
    ids: list[str] = []
    for d in dirs:
        name = base = re.sub(r"[^\w.:-]", "-", d.resolve().name) or "model"
        for n in itertools.count(2):
            if name not in ids:
                break
            name = f"{base}-{n}"
        ids.append(name)
    return ids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Endpoint:
    """A child process serving model directories on loopback while the context is open.

    Args:
        models: model id -> what to serve under it (the first is loaded at start).
        log: receives the child's output.
        start_timeout: seconds to wait for the engine (loading a large model takes long).
        cancel: set it to stop waiting (the child is stopped).

    Raises:
        EndpointError: the child exited or did not answer in time.
        OperationCancelledError: ``cancel`` was set while the engine started.
    """

    def __init__(
        self,
        models: dict[str, Served],
        log: Path,
        start_timeout: float = 900,
        cancel: threading.Event | None = None,
    ) -> None:
        self.cancel = cancel
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.start_timeout = start_timeout
        spec = {i: _describe(m) for i, m in models.items()}
        self.command = [sys.executable, "-m", "app.evals.endpoint", "--port", str(self.port),
                        "--models", json.dumps(spec)]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Endpoint:
        import httpx

        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as sink:
            self.proc = lifeline.spawn(
                self.command,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=offline_env(),
            )
        try:  # whatever stops the wait (a timeout, a cancel, a signal) stops the child
            self._wait_ready(httpx)
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ready(self, httpx: Any) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.cancel is not None and self.cancel.is_set():
                self.close()
                raise OperationCancelledError("evaluation cancelled while the engine started")
            if self.proc.poll() is not None:
                raise EndpointError(f"the engine exited ({self.proc.returncode}): {self.tail()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise EndpointError(
            f"the engine did not start within {self.start_timeout:.0f} s; {self.log}"
        )

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the child (SIGTERM: the engine shuts down; SIGKILL after 30 s) and what
        is left of the engine processes it started."""
        if self.proc is not None:
            lifeline.stop(self.proc, grace=30)

    def tail(self, lines: int = 6) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
        return " | ".join(text) or f"no output (log: {self.log})"


def _describe(m: Served) -> dict[str, Any]:
    inline = m.inline
    return {
        "model_dir": str(m.model_dir),
        "template_dir": str(m.template_dir or ""),
        "residual_dir": str(inline.residual_dir) if inline else "",
        "alpha": inline.alpha if inline else 1.0,
    }


def _served(m: dict[str, Any]) -> Served:
    model_dir = Path(m["model_dir"])
    template = Path(m["template_dir"]) if m["template_dir"] else None
    residual = m.get("residual_dir")
    inline = InlineMerge(Path(residual), model_dir, float(m["alpha"])) if residual else None
    return Served(model_dir, template, inline)


def main(argv: list[str] | None = None) -> None:
    """``python -m app.evals.endpoint --port P --models '{"id": {"model_dir": …,
    "template_dir": …}, …}'``."""
    import uvicorn

    from app.core.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m app.evals.endpoint")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models", required=True, help="JSON: id -> model_dir, template_dir")
    args = parser.parse_args(argv)
    models = {i: _served(m) for i, m in json.loads(args.models).items()}
    serving = DirectoryServing(get_settings(), models)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    uvicorn.run(create_endpoint_app(serving), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
