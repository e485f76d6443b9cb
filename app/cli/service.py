"""Service commands: demo, serve, worker, keygen."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app import __version__
from app.cli.common import _fail, app, err, friendly, out
from app.core.settings import get_settings


@app.command()
@friendly
def demo(
    workdir: Annotated[Path, typer.Option(help="Where to build the demo models.")] = Path(
        "models_cache/demo"
    ),
) -> None:
    """Build tiny Llama models, merge them and chat with the result."""
    from app.demo.run import run_demo

    run_demo(workdir, console=err, stdout=out)


@app.command()
@friendly
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [default: $REALIGN_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [default: $REALIGN_PORT].")] = None,
) -> None:
    """Run the REST service: POST /merge, jobs, chat, admin (embedded worker without Redis).

    Without REALIGN_REDIS_URL one process runs the API, an in-process worker and the CPU
    engine; with it, `realign worker` processes take the merges.
    """
    import uvicorn

    from app.api.app import create_app

    settings = get_settings()
    settings = settings.model_copy(
        update={"host": host or settings.host, "port": port or settings.port}
    )
    mode = f"Redis at {settings.redis_url}" if settings.redis_url else "embedded (no Redis)"
    err.print(
        f"realign {__version__} serving on http://{settings.host}:{settings.port} — {mode}; "
        f"API docs at /docs, admin page at /admin"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
    )


@app.command()
@friendly
def worker(
    queues: Annotated[str, typer.Option("--queues", "-Q", help="Queues to consume.")] = "gpu,cpu",
    name: Annotated[str, typer.Option(help="Worker name (Celery hostname).")] = "realign@%h",
) -> None:
    """Run a Celery worker (one per GPU) for the distributed service; needs REALIGN_REDIS_URL."""
    if not get_settings().redis_url:
        raise _fail(
            "set REALIGN_REDIS_URL: workers take jobs from Redis (without it, "
            "`realign serve` runs an in-process worker)",
            2,
        )
    from workers.celery_app import celery_app

    celery_app.worker_main(
        [
            "worker",
            "-Q",
            queues,
            "-n",
            name,
            "--pool",
            "solo",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "INFO",
        ]
    )


@app.command()
def keygen(
    name: Annotated[str, typer.Argument(help="Who the key is for.")],
    role: Annotated[str, typer.Option(help="user or admin.")] = "user",
) -> None:
    """Make an API key: prints the secret once, and the REALIGN_API_KEYS entry to store."""
    import json
    import secrets

    from app.api.auth import hash_key

    token = f"rk-{secrets.token_urlsafe(32)}"
    err.print("give this key to its owner (it is not stored anywhere):")
    out.print(token, highlight=False)
    err.print("add this entry to the JSON list in REALIGN_API_KEYS:")
    err.print(
        json.dumps({"name": name, "role": role, "sha256": hash_key(token)}),
        highlight=False,
        soft_wrap=True,
    )
