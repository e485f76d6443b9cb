"""Service commands: demo, serve, worker, keygen."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from app import __version__
from app.cli.common import app, err, fail, friendly, out
from app.cli.extras import missing, report, require
from app.cli.gpus import parse_gpus, run_per_gpu
from app.core.settings import get_settings

ROLES = ("all", "api", "serving")
ROLE_TEXT = {
    "all": "job API and engines",
    "api": "job API only (role api)",
    "serving": "serving replica (role serving)",
}
DEFAULT_STEPS = 300  # app.demo.train.DEFAULT_STEPS, without importing torch for --help


def _import_failure(command: str, extra: str, exc: ImportError) -> NoReturn:
    """A missing third-party module names the extra (one line, exit 1); our own import
    errors stay bugs."""
    name = exc.name or ""
    if name.split(".")[0] in ("app", "workers"):
        raise exc
    report(missing(command, extra, name or str(exc)))


@app.command()
@friendly
def demo(
    workdir: Annotated[
        Path,
        typer.Option(
            help="Where the demo's trained models live; the service's store stays "
            "$REALIGN_MODELS_CACHE_DIR."
        ),
    ] = Path("models_cache/demo"),
    port: Annotated[
        int | None,
        typer.Option(help="Port of the demo's server (default: $REALIGN_PORT if free, else any)."),
    ] = None,
    steps: Annotated[
        int, typer.Option(hidden=True, help="Pre-training steps (tests use a few).")
    ] = DEFAULT_STEPS,
    eval_limit: Annotated[
        int | None, typer.Option(hidden=True, help="Examples per evaluation suite (tests).")
    ] = None,
) -> None:
    """Run the service path on tiny trained models: start `realign serve`, POST /merge
    with serve=true, follow the job, chat through the OpenAI SDK; then score base,
    instruct, new_base and the merge on the evaluation suites (format, ifeval-lite, news
    perplexity).

    The first run trains a tiny base, instruct and new base (about a minute on two
    cores); later runs reuse them. Needs the 'demo' extra (`make demo` installs it).
    """
    require("demo", "demo")
    from app.demo.run import run_demo

    run_demo(workdir, console=err, stdout=out, port=port, steps=steps, eval_limit=eval_limit)


@app.command()
@friendly
def serve(
    host: Annotated[
        str | None,
        typer.Option(
            help="Bind address (default: $REALIGN_HOST, else 127.0.0.1); any other than "
            "loopback needs REALIGN_API_KEYS.",
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Port (default: $REALIGN_PORT, else 8000).", show_default=False),
    ] = None,
    role: Annotated[
        str | None,
        typer.Option(
            help="all: job API and engines in one process; api: the job plane only (no "
            "engines); serving: engines and the OpenAI routes only (default: "
            "$REALIGN_SERVE_ROLE, else all). api and serving need REALIGN_REDIS_URL.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the REST service: POST /merge, jobs, OpenAI-compatible chat, admin.

    Without REALIGN_REDIS_URL one process runs the API, an in-process worker and the
    engine (vLLM when installed, else transformers on the CPU); with it, `realign worker`
    processes take the merges, and the job API (--role api) and any number of serving
    replicas (--role serving) can run apart. Settings come from REALIGN_* variables (see
    the README).

    Example: realign serve --port 8000, then open http://127.0.0.1:8000/docs
    """
    settings = get_settings()
    if role is not None and role not in ROLES:
        raise fail(f"--role {role}: use one of {', '.join(ROLES)}", 2)
    require("serve", "serve")
    try:
        import uvicorn

        from app.api.app import create_app
    except ImportError as exc:
        _import_failure("serve", "serve", exc)

    settings = settings.model_copy(
        update={
            "host": host or settings.host,
            "port": port or settings.port,
            "serve_role": role or settings.serve_role,
        }
    )
    mode = f"Redis at {settings.redis_url}" if settings.redis_url else "embedded (no Redis)"
    application = create_app(settings)
    err.print(
        f"realign {__version__} serving on http://{settings.host}:{settings.port} — "
        f"{ROLE_TEXT[settings.serve_role]}, {mode}; API docs at /docs"
        + (", admin page at /admin" if settings.serve_role != "serving" else ""),
        soft_wrap=True,
    )
    uvicorn.run(
        application, host=settings.host, port=settings.port, log_level=settings.log_level.lower()
    )


@app.command()
@friendly
def worker(
    queues: Annotated[
        str, typer.Option("--queues", "-Q", help="Queues to consume, comma-separated.")
    ] = "gpu,cpu",
    name: Annotated[
        str, typer.Option(help="Worker name (Celery hostname; %h = this host).")
    ] = "realign@%h",
    gpus: Annotated[
        str | None,
        typer.Option(
            "--gpus",
            help="Run one worker process per listed GPU (e.g. 0,1), each with "
            "CUDA_VISIBLE_DEVICES set to its GPU and REALIGN_DEVICE=cuda.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run a Celery worker (one per GPU) for the distributed service; needs REALIGN_REDIS_URL.

    It takes merge jobs from Redis, writes into the store (REALIGN_MODELS_CACHE_DIR, shared
    with the API) and reports progress in the job records.

    Example: REALIGN_REDIS_URL=redis://redis:6379/0 REALIGN_DEVICE=cuda realign worker -Q gpu
    """
    if not get_settings().redis_url:
        raise fail(
            "set REALIGN_REDIS_URL: workers take jobs from Redis (without it, "
            "`realign serve` runs an in-process worker)",
            2,
        )
    from app.residuals.devices import check_device

    if gpus is not None:
        raise SystemExit(run_per_gpu(parse_gpus(gpus), queues, name))
    check_device(get_settings().device)  # a CUDA worker without CUDA must not take jobs
    require("worker", "serve")
    try:
        from workers.celery_app import celery_app
    except ImportError as exc:
        _import_failure("worker", "serve", exc)

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
@friendly
def keygen(
    name: Annotated[str, typer.Argument(help="Who the key is for.")],
    role: Annotated[str, typer.Option(help="user or admin.")] = "user",
) -> None:
    """Make an API key: prints the secret once, and the REALIGN_API_KEYS entry to store.

    Only the key's sha256 goes into REALIGN_API_KEYS (a JSON list of the printed entries).

    Example: realign keygen alice --role admin
    """
    import json
    import secrets

    try:
        from app.api.auth import hash_key
    except ImportError as exc:
        _import_failure("keygen", "serve", exc)

    token = f"rk-{secrets.token_urlsafe(32)}"
    err.print("give this key to its owner (it is not stored anywhere):")
    out.print(token, highlight=False)
    err.print("add this entry to the JSON list in REALIGN_API_KEYS:")
    err.print(
        json.dumps({"name": name, "role": role, "sha256": hash_key(token)}),
        highlight=False,
        soft_wrap=True,
    )
