"""``realign`` command line: compute, apply and merge instruction residuals."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from app import __version__
from app.core.errors import OperationCancelledError, RealignError
from app.core.logging import configure_logging
from app.core.settings import get_settings
from app.residuals.progress import Progress as Snapshot

app = typer.Typer(
    name="realign",
    help="Keep LLMs instruction-aligned while their knowledge moves: "
    "new_instruct = new_base + alpha * (instruct - base).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
out = Console()
log = logging.getLogger("app.cli")
F = TypeVar("F", bound=Callable[..., Any])

Base = Annotated[
    str, typer.Option("--base", "-b", help="Base model: directory or hf:org/name@rev.")
]
Instruct = Annotated[
    str, typer.Option("--instruct", "-i", help="Instruct model tuned from --base.")
]
Target = Annotated[
    str, typer.Option("--target", "-t", help="New base (e.g. continually pre-trained).")
]
OutDir = Annotated[
    Path, typer.Option("--out", "-o", help="Output model directory (must not exist).")
]
Alpha = Annotated[float, typer.Option("--alpha", help="Residual scale.")]
DType = Annotated[
    str, typer.Option("--dtype", help="Residual storage dtype: bfloat16, float16 or float32.")
]
Store = Annotated[
    Path | None,
    typer.Option(
        "--store", help="Store directory [default: $REALIGN_MODELS_CACHE_DIR].", show_default=False
    ),
]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda[:N].")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def friendly(fn: F) -> F:
    """Turn user mistakes into one-line errors with a non-zero exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OperationCancelledError as exc:
            raise _fail(str(exc), 130) from None
        except KeyboardInterrupt:
            raise _fail("interrupted; nothing was published", 130) from None
        except (RealignError, ValueError) as exc:
            raise _fail(str(exc), 1) from None
        except OSError as exc:
            raise _fail(f"{exc.filename or ''}: {exc.strerror or exc}", 1) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress_bar(
    quiet: bool,
) -> Iterator[tuple[Callable[[Snapshot], None] | None, threading.Event]]:
    """A rich progress bar fed by the engine's progress callback; Ctrl-C cancels."""
    cancel = threading.Event()
    if quiet or not err.is_terminal:
        yield None, cancel
        return
    bar = Progress(
        TextColumn("{task.description:<9}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(p: Snapshot) -> None:
        if p.stage not in tasks:
            tasks[p.stage] = bar.add_task(p.stage, total=p.bytes_total)
        bar.update(tasks[p.stage], completed=p.bytes_done)

    with bar:
        yield update, cancel


@app.command()
@friendly
def merge(
    base: Base,
    instruct: Instruct,
    target: Target,
    out_dir: OutDir,
    alpha: Alpha = 1.0,
    dtype: DType = "bfloat16",
    store: Store = None,
    device: Device = "cpu",
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="One fused pass; do not store the residual.")
    ] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Merge: out = target + alpha * (instruct - base), reusing a cached residual."""
    from app.merge import merge as run

    with progress_bar(quiet) as (cb, cancel):
        res = run(
            base,
            instruct,
            target,
            out_dir,
            alpha=alpha,
            dtype=dtype,
            store=store,
            device=device,
            no_cache=no_cache,
            progress=cb,
            cancel=cancel,
            overwrite=overwrite,
        )
    if res.residual_key:
        how = "computed" if res.residual_created else "reused"
        err.print(f"residual {res.residual_key} ({how})")
    err.print(f"merged model written to {res.out}")
    out.print(str(res.out), highlight=False)


@app.command()
@friendly
def compute(
    base: Base,
    instruct: Instruct,
    dtype: DType = "bfloat16",
    store: Store = None,
    device: Device = "cpu",
    quiet: Quiet = False,
) -> None:
    """Compute (or reuse) the residual instruct - base; prints its key last."""
    from app.merge import compute as run

    with progress_bar(quiet) as (cb, cancel):
        res = run(
            base, instruct, dtype=dtype, store=store, device=device, progress=cb, cancel=cancel
        )
    size = res.manifest.total_bytes / 1e6
    err.print(f"{'computed' if res.created else 'reused'} residual at {res.path} ({size:.1f} MB)")
    out.print(res.key, highlight=False)


@app.command()
@friendly
def apply(
    residual: Annotated[
        str, typer.Option("--residual", "-r", help="Residual key, key prefix or pack dir.")
    ],
    target: Target,
    out_dir: OutDir,
    alpha: Alpha = 1.0,
    store: Store = None,
    device: Device = "cpu",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Apply a residual to a new base: out = target + alpha * R."""
    from app.merge import apply as run

    with progress_bar(quiet) as (cb, cancel):
        res = run(
            residual,
            target,
            out_dir,
            alpha=alpha,
            store=store,
            device=device,
            progress=cb,
            cancel=cancel,
            overwrite=overwrite,
        )
    err.print(f"merged model written to {res.out}")
    out.print(str(res.out), highlight=False)


@app.command()
@friendly
def inspect(
    ref: Annotated[str, typer.Argument(help="Residual key or dir, or a merged model dir.")],
    store: Store = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest.")] = False,
) -> None:
    """Show what a residual pack or a merged model is made of."""
    from app.merge import inspect as run
    from app.residuals.manifest import ResidualManifest

    m = run(ref, store)
    if as_json:
        out.print_json(m.model_dump_json())
        return
    out.print(f"[bold]{m.format}[/]  method={m.method}")
    out.print(f"  instruct  {m.instruct.ref}  ({m.instruct.digest[:12]})")
    out.print(f"  base      {m.base.ref}  ({m.base.digest[:12]})")
    if isinstance(m, ResidualManifest):
        out.print(
            f"  key {m.key}  dtype {m.dtype}  family {m.family.model_type}  "
            f"{len(m.tensors)} tensors  {m.total_bytes / 1e6:.1f} MB"
        )
        top = sorted(m.tensors.items(), key=lambda kv: kv[1].norm, reverse=True)[:5]
        for name, t in top:
            out.print(f"    {name:<50} |R|={t.norm:.4g} max={t.max_abs:.3g}", highlight=False)
    else:
        out.print(f"  target    {m.target.ref}  ({m.target.digest[:12]})")
        out.print(f"  alpha {m.alpha}  residual {m.residual_key or 'fused, not stored'}")
    if m.vocab:
        out.print(
            f"  vocabulary {m.vocab.base_rows} -> {m.vocab.instruct_rows} rows ({m.vocab.policy})"
        )


@app.command()
@friendly
def verify(
    key: Annotated[str, typer.Argument(help="Residual key or prefix.")], store: Store = None
) -> None:
    """Check every file of a stored residual against its sha256."""
    from app.merge import verify as run

    m = run(key, store)
    out.print(f"ok {m.key}: {len(m.files)} files verified")


@app.command("ls")
@friendly
def list_(store: Store = None) -> None:
    """List stored residuals and merged models."""
    from app.merge import list_artifacts

    table = Table("key", "kind", "size", "last used", "in use")
    table.columns[0].no_wrap = True
    for a in list_artifacts(store):
        used = datetime.fromtimestamp(a.last_used, UTC).strftime("%Y-%m-%d %H:%M")
        table.add_row(a.key, a.kind, f"{a.size / 1e6:.1f} MB", used, "yes" if a.in_use else "")
    out.print(table)


@app.command("rm")
@friendly
def rm(
    key: Annotated[str, typer.Argument(help="Residual key or prefix.")], store: Store = None
) -> None:
    """Delete a stored residual (refused while a job uses it)."""
    from app.merge import remove

    out.print(f"removed {remove(key, store)}")


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
    """Run the REST service (POST /merge, job status, admin). Without REALIGN_REDIS_URL it
    also runs an in-process worker (embedded mode)."""
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


def _version(value: bool) -> None:
    if value:
        out.print(f"realign {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs.")] = False,
) -> None:
    """Realign command line."""
    configure_logging("DEBUG" if verbose else get_settings().log_level)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="realign")


if __name__ == "__main__":
    main()
