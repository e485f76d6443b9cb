"""Residual pack commands beyond compute and apply: convert between pack formats."""

from __future__ import annotations

from typing import Annotated

import typer

from app.cli.common import (
    Device,
    PackTo,
    Quiet,
    Store,
    app,
    builder_store,
    err,
    friendly,
    lineage_note,
    out,
    progress_bar,
)


@app.command()
@friendly
def convert(
    key: Annotated[str, typer.Argument(help="Residual key or prefix.")],
    dtype: PackTo,
    rm_old: Annotated[
        bool,
        typer.Option(
            "--rm-old",
            help="Remove the old pack once the new one is stored (merged models made from "
            "it are kept; refused, with a warning, while a job reads it).",
        ),
    ] = False,
    store: Store = None,
    device: Device = "cpu",
    quiet: Quiet = False,
) -> None:
    """Make the pack of the same instruct, base and method in another format, from the
    sources its manifest records (their digests are checked first); prints its key last.
    The same format prints the same key.

    Example: NEW=$(realign convert "$KEY" --pack exact | tail -1)
    """
    from app.merge import convert as run

    with progress_bar(quiet) as (cb, cancel):
        res = run(
            key,
            dtype,
            remove_old=rm_old,
            store=builder_store(store),
            device=device,
            progress=cb,
            cancel=cancel,
            notice=lambda message: err.print(f"warning: {message}", highlight=False),
        )
    lineage_note(res.lineage)
    fmt, was = res.manifest.dtype, f"residual {res.old_key}"
    if res.key == res.old_key:
        err.print(f"{was} is stored as {fmt} already", highlight=False)
    else:
        how = "computed" if res.created else "stored already"
        err.print(
            f"{was} in format {fmt}: {res.path} ({how}, {res.manifest.total_bytes / 1e6:.1f} MB)"
            + ("; the old pack was removed" if res.removed_old else ""),
            highlight=False,
        )
    out.print(res.key, highlight=False)
