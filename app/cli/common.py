"""Shared pieces of the ``realign`` command line: the app, options, errors, progress."""

from __future__ import annotations

import errno
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

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
from rich.text import Text

from app.core.errors import OperationCancelledError, RealignError
from app.core.settings import get_settings
from app.residuals.progress import Progress as Snapshot

if TYPE_CHECKING:
    from app.residuals.manifest import LineageInfo

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
_PACK_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _pack(value: str | None) -> str | None:
    if value is None:
        return None
    return _PACK_ALIASES.get(value.lower(), value)  # others are checked with the request


DType = Annotated[
    str | None,
    typer.Option(
        "--pack",
        "--dtype",
        callback=_pack,
        help="Residual pack format: exact (R = instruct - base kept exactly, coded smaller "
        "than bf16; the merge gives the bits of --no-cache), R rounded to bfloat16 / "
        "float16 / float32 (bf16, fp16, fp32), or lossy, opt-in: int8, int4 (absmax "
        "integers with fp32 scales) or bitdelta (1-bit signs, a scale per row); "
        "`realign inspect` shows their error. Default: $REALIGN_RESIDUAL_DTYPE, else exact.",
        show_default=False,
    ),
]
PackTo = Annotated[
    str,
    typer.Option(
        "--pack",
        "--dtype",
        callback=_pack,
        help="Pack format to convert to: exact (lossless), or R rounded to bfloat16 / "
        "float16 / float32 (bf16, fp16, fp32).",
        show_default=False,
    ),
]
Store = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help="Store directory (default: $REALIGN_MODELS_CACHE_DIR, else models_cache).",
        show_default=False,
    ),
]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda[:N].")]
if TYPE_CHECKING:
    from app.store.base import Store as StoreT
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
Force = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Merge even when the lineage check finds a model unrelated to the base "
        "(the figures are recorded in realign.json and the model card).",
    ),
]


def builder_store(store: Path | None) -> Path | StoreT | None:
    """``--store``; else, with an object store, the configured store whose builders
    share the cluster's build lock (Redis), so a key is built once across machines;
    else None (the configured store, opened by the verb)."""
    if store is not None:
        return store
    settings = get_settings()
    if not settings.store_url:
        return None
    from app.jobs.locks import cluster_store

    return cluster_store(settings)


def fail(message: str, code: int) -> typer.Exit:
    # The message is plain text: `[serve]` in it is an extra's name, not markup.
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    return typer.Exit(code)


def friendly(fn: F) -> F:
    """Turn user mistakes into one-line errors with a non-zero exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OperationCancelledError as exc:
            raise fail(str(exc), 130) from None
        except KeyboardInterrupt:
            raise fail("interrupted; nothing was published", 130) from None
        except (RealignError, ValueError) as exc:
            raise fail(str(exc), 1) from None
        except OSError as exc:
            raise fail(os_error_message(exc), 1) from None

    return wrapper  # type: ignore[return-value]


def lineage_note(info: LineageInfo | None) -> None:
    """Tell the user what the lineage check measured (a warning when forced past it)."""
    if info is None:
        return
    if info.passed:
        err.print(f"lineage: {info.summary()}", highlight=False, soft_wrap=True)
        return
    err.print(
        Text.assemble(
            ("warning:", "bold yellow"),
            f" lineage: {info.summary()} — task arithmetic needs models of one lineage, so "
            "the result may be noise",
        ),
        highlight=False, soft_wrap=True,
    )  # fmt: skip


def os_error_message(exc: OSError) -> str:
    """One line: the file(s) involved when known, what the OS said, and for a full
    disk what to do."""
    reason = exc.strerror or str(exc) or exc.__class__.__name__
    files = [str(f) for f in (exc.filename, exc.filename2) if f not in (None, "")]
    text = f"{' -> '.join(files)}: {reason}" if files else reason
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        text += " — free space there or choose another --out / REALIGN_MODELS_CACHE_DIR"
    return text


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
