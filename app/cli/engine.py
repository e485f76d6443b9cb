"""Residual engine commands: merge, compute, apply, inspect, verify, ls, rm."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from app.cli.common import (
    Alpha,
    Base,
    Device,
    DType,
    Force,
    Instruct,
    OutDir,
    Overwrite,
    Quiet,
    Store,
    Target,
    app,
    builder_store,
    err,
    fail,
    friendly,
    lineage_note,
    out,
    progress_bar,
)
from app.cli.methods import (
    Density,
    DropRate,
    Method,
    Param,
    Seed,
    Weight,
    method_params,
    weighted,
)


@app.command()
@friendly
def merge(
    base: Base,
    instruct: Instruct,
    target: Target,
    out_dir: OutDir,
    alpha: Alpha = 1.0,
    dtype: DType = None,
    store: Store = None,
    device: Device = "cpu",
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="One fused pass; do not store the residual.")
    ] = False,
    overwrite: Overwrite = False,
    force: Force = False,
    quiet: Quiet = False,
    method: Method = "task_arithmetic",
    density: Density = None,
    drop_rate: DropRate = None,
    seed: Seed = None,
    param: Param = None,
) -> None:
    """Merge: out = target + alpha * (instruct - base), reusing a cached residual.

    Models are local Hugging Face directories or hf:org/name@rev. The residual is
    computed once and stored (unless --no-cache); prints the output directory last.
    --method ties or dare transform the stored residual as it is applied.

    Example: realign merge -b base/ -i instruct/ -t new_base/ -o merged/
    """
    from app.merge import merge as run

    params = method_params(method, density, drop_rate, seed, param)
    if no_cache and method != "task_arithmetic":
        raise fail(
            f"--no-cache runs the fused one-pass task-arithmetic merge; --method {method} "
            "transforms a stored residual as it applies it: drop --no-cache",
            2,
        )
    with progress_bar(quiet) as (cb, cancel):
        res = run(
            base,
            instruct,
            target,
            out_dir,
            alpha=alpha,
            dtype=dtype,
            store=builder_store(store),
            device=device,
            no_cache=no_cache,
            progress=cb,
            cancel=cancel,
            overwrite=overwrite,
            method=method,
            params=params,
            force=force,
        )
    lineage_note(res.manifest.lineage)
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
    dtype: DType = None,
    store: Store = None,
    device: Device = "cpu",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Compute (or reuse) the residual instruct - base; prints its key last.

    Example: KEY=$(realign compute -b base/ -i instruct/ | tail -1)
    """
    from app.merge import compute as run

    with progress_bar(quiet) as (cb, cancel):
        res = run(
            base,
            instruct,
            dtype=dtype,
            store=builder_store(store),
            device=device,
            progress=cb,
            cancel=cancel,
            force=force,
        )
    lineage_note(res.lineage)
    size = res.manifest.total_bytes / 1e6
    err.print(f"{'computed' if res.created else 'reused'} residual at {res.path} ({size:.1f} MB)")
    out.print(res.key, highlight=False)


@app.command()
@friendly
def apply(
    residual: Annotated[
        list[str],
        typer.Option(
            "--residual",
            "-r",
            help="Residual key, key prefix or pack dir; repeat it to merge several in one pass.",
        ),
    ],
    target: Target,
    out_dir: OutDir,
    alpha: Alpha = 1.0,
    store: Store = None,
    device: Device = "cpu",
    overwrite: Overwrite = False,
    force: Force = False,
    quiet: Quiet = False,
    weight: Weight = None,
    method: Method = "task_arithmetic",
    density: Density = None,
    drop_rate: DropRate = None,
    seed: Seed = None,
    param: Param = None,
) -> None:
    """Apply a residual to a new base: out = target + alpha * R.

    With several --residual (and --weight), out = target + alpha * merge(w_i * R_i)
    by --method, in one pass over the target.

    Example: realign apply -r "$KEY" -t new_base/ -o merged/ --alpha 0.8
    """
    from app.merge import ResidualInput
    from app.merge import apply as run

    params = method_params(method, density, drop_rate, seed, param)
    pairs = weighted(residual, weight)
    residuals = [ResidualInput(key=k, weight=w) for k, w in pairs]
    with progress_bar(quiet) as (cb, cancel):
        res = run(
            residual[0] if len(pairs) == 1 and pairs[0][1] == 1.0 else residuals,
            target,
            out_dir,
            alpha=alpha,
            store=builder_store(store),
            device=device,
            progress=cb,
            cancel=cancel,
            overwrite=overwrite,
            method=method,
            params=params,
            force=force,
        )
    lineage_note(res.manifest.lineage)
    err.print(f"merged model written to {res.out}")
    out.print(str(res.out), highlight=False)


@app.command()
@friendly
def inspect(
    ref: Annotated[str, typer.Argument(help="Residual key or dir, or a merged model key or dir.")],
    store: Store = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest.")] = False,
) -> None:
    """Show what a residual pack or a merged model is made of: sources and their hashes,
    dtype, the largest per-tensor norms, the vocabulary policy; a merged model's stored
    evaluation scores.

    Example: realign inspect "$KEY" --json
    """
    from app.merge import evaluations
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
        out.print(f"  pack {m.storage_line()}", highlight=False, soft_wrap=True)
        if m.fidelity is not None:
            out.print(f"  fidelity {m.fidelity.summary()}", highlight=False, soft_wrap=True)
        top = sorted(m.tensors.items(), key=lambda kv: kv[1].norm, reverse=True)[:5]
        for name, t in top:
            out.print(f"    {name:<50} |R|={t.norm:.4g} max={t.max_abs:.3g}", highlight=False)
    else:
        out.print(f"  target    {m.target.ref}  ({m.target.digest[:12]})")
        out.print(f"  alpha {m.alpha}  residual {m.residual_key or 'fused, not stored'}")
        if m.params:
            out.print("  params " + "  ".join(f"{k}={v}" for k, v in m.params.items()))
        for r in m.residuals:
            out.print(f"    residual {r.key}  weight {r.weight}  ({r.instruct})", highlight=False)
        if m.lineage is not None:
            out.print(f"  lineage {m.lineage.summary()}", highlight=False)
        for e in evaluations(ref, store):  # scores stored beside it (app.evals.stored)
            figures = "  ".join(f"{k}={v:.4g}" for k, v in e.score.metrics.items())
            asked = f"n={e.score.n} limit={e.inputs.get('limit')} {e.created:%Y-%m-%d %H:%M}"
            out.print(f"  eval {e.suite:<12} {figures}  ({asked})", highlight=False)
    if m.vocab:
        out.print(
            f"  vocabulary {m.vocab.base_rows} -> {m.vocab.instruct_rows} rows ({m.vocab.policy})"
        )


@app.command()
@friendly
def verify(
    key: Annotated[str, typer.Argument(help="Residual key or prefix.")], store: Store = None
) -> None:
    """Check every file of a stored residual against its manifest; exits 1 on a mismatch.

    Example: realign verify "$KEY"
    """
    from app.merge import verify as run

    m = run(key, store)
    out.print(f"ok {m.key}: {len(m.files)} files verified")


@app.command("ls")
@friendly
def list_(store: Store = None) -> None:
    """List stored residuals and merged models: key, kind, size, last use, in use."""
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
    """Delete a stored residual (refused while a job uses it).

    Example: realign rm "$KEY"
    """
    from app.merge import remove

    out.print(f"removed {remove(key, store)}")
