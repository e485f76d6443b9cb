"""compute_residual: stream ``instruct - base`` into a residual pack."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, cast

import app
from app.core.errors import DeviceUnavailableError, InvalidParameterError
from app.residuals import native
from app.residuals.assets import INSTRUCT_CONFIG, copy_assets, special_tokens
from app.residuals.checkpoint import Checkpoint
from app.residuals.compat import (
    Pairing,
    check_family,
    check_tokenizers,
    family_of,
    pair_tensors,
)
from app.residuals.dtypes import BF16, EXACT, F32, DType, exact_dtype, is_lossy
from app.residuals.framed import FRAMES_INDEX
from app.residuals.framewriter import FramedWriter
from app.residuals.manifest import (
    RESIDUAL_MANIFEST,
    ResidualManifest,
    ResidualTensor,
    SourceInfo,
    file_entry,
    write_json,
    written_entries,
)
from app.residuals.remote_code import strip_auto_map
from app.residuals.shards import ShardedWriter, TensorSpec
from app.residuals.sources import RunOptions, file_order, make_runner
from app.residuals.tensorjobs import Source, TensorJob, TensorStats

if TYPE_CHECKING:
    from app.residuals.coded import LossyWriter

RESIDUAL_PREFIX = "residual"


def preflight_residual(instruct: Checkpoint, base: Checkpoint) -> None:
    """All checks of a residual computation that need no tensor data."""
    plan_residual(instruct, base, BF16)


def compute_residual(
    instruct: Checkpoint,
    base: Checkpoint,
    out_dir: Path,
    *,
    instruct_src: SourceInfo,
    base_src: SourceInfo,
    dtype: DType = EXACT,
    method: str = "task_arithmetic",
    key: str | None = None,
    opts: RunOptions | None = None,
) -> ResidualManifest:
    """Write the residual pack of (instruct, base) into the empty directory ``out_dir``.

    Args:
        instruct: the instruction-tuned checkpoint.
        base: the checkpoint it was tuned from.
        out_dir: an empty directory (normally a staging dir that is published after).
        instruct_src: identity of ``instruct`` for the manifest.
        base_src: identity of ``base``.
        dtype: pack format of R: exact (lossless), float32 / bfloat16 / float16 (R rounded
            to it), or int8 / int4 / bitdelta (R coded with fp32 scales, see
            :mod:`app.residuals.coded`).
        method: merge method name from the registry.
        key: the store key, recorded in the manifest.
        opts: device, progress, cancellation, shard size.

    Returns:
        The manifest, also written as ``manifest.json``.

    Raises:
        IncompatibleModelsError: the pair fails preflight.
        OperationCancelledError: cancelled; the caller discards ``out_dir``.
    """
    opts = opts or RunOptions()
    jobs, pairing = plan_residual(instruct, base, dtype)
    runner = make_runner(method, "residual", opts)
    with residual_writer(out_dir, jobs, opts, dtype) as writer:
        stats = runner.run(jobs, writer)
    return finish_residual(
        out_dir,
        writer,
        jobs,
        stats,
        pairing,
        instruct,
        sources=(instruct_src, base_src),
        dtype=dtype,
        method=method,
        key=key,
    )


def plan_residual(
    instruct: Checkpoint, base: Checkpoint, dtype: DType
) -> tuple[list[TensorJob], Pairing]:
    """Preflight of (instruct, base) and the residual's tensor jobs, in instruct's order.

    Raises:
        IncompatibleModelsError: the pair fails preflight.
    """
    check_family(family_of(instruct.config), family_of(base.config), "instruct", "base")
    pairing = pair_tensors(instruct, base)
    check_tokenizers(instruct.path, base.path)
    order = [n for n in file_order(instruct.tensors) if n in pairing.combine]
    exact = dtype == EXACT
    if exact:
        check_exact(pairing)
    lossy = is_lossy(dtype)  # coded by the writer from R in fp32
    jobs = []
    for name in order:
        i, b = pairing.combine[name]
        stored = exact_dtype(i.dtype, b.dtype) if exact else F32 if lossy else dtype
        jobs.append(
            TensorJob(
                spec=TensorSpec(name, stored, i.shape),
                kind="residual",
                inputs=(Source(instruct, i), Source(base, b)),
                common_rows=pairing.common_rows[name],
                exact=exact,
            )
        )
    return jobs, pairing


Writer: TypeAlias = "ShardedWriter | FramedWriter | LossyWriter"


def check_exact(pairing: Pairing) -> None:
    """Refuse, before any tensor is read, what an exact pack cannot hold here.

    Raises:
        InvalidParameterError: weights other than bf16/fp16/fp32 (fp64, fp8).
        DeviceUnavailableError: the native kernel that splits residuals is not built.
    """
    for name, (i, b) in pairing.combine.items():
        odd = next((d for d in (i.dtype, b.dtype) if d.code not in ("BF16", "F16", "F32")), None)
        if odd is not None:
            raise InvalidParameterError(
                f"{name} is {odd.name}: exact residual packs hold bfloat16, float16 and "
                "float32 weights; use --pack float32 (or convert the models) for this pair"
            )
    if not native.available():
        raise DeviceUnavailableError(
            f"exact residual packs need the native kernel: {native.load_error()}; or use "
            "--pack bfloat16"
        )


def residual_writer(out_dir: Path, jobs: list[TensorJob], opts: RunOptions, dtype: DType) -> Writer:
    """The writer of a residual pack (checksums of every file while writing): frames for
    an exact pack, codes and scales for a lossy one (``dtype`` names it), safetensors
    shards of R otherwise."""
    if is_lossy(dtype):
        from app.residuals.coded import LossyWriter  # numpy: only for lossy packs
        from app.residuals.lossy import lossy_format

        fmt = lossy_format(dtype)
        assert fmt is not None
        return LossyWriter(
            out_dir, jobs, fmt, prefix=RESIDUAL_PREFIX, max_shard_bytes=opts.max_shard_bytes
        )
    if any(j.exact for j in jobs):
        return FramedWriter(out_dir, [j.spec for j in jobs], max_file_bytes=opts.max_shard_bytes)
    return ShardedWriter(
        out_dir,
        [j.spec for j in jobs],
        prefix=RESIDUAL_PREFIX,
        max_shard_bytes=opts.max_shard_bytes,
    )


def finish_residual(
    out_dir: Path,
    writer: Writer,
    jobs: list[TensorJob],
    stats: dict[str, TensorStats],
    pairing: Pairing,
    instruct: Checkpoint,
    *,
    sources: tuple[SourceInfo, SourceInfo],
    dtype: DType,
    method: str,
    key: str | None,
) -> ResidualManifest:
    """Copy the instruct side's assets next to the written shards and write the manifest."""
    files = written_entries(writer)
    lossy = cast("LossyWriter", writer) if hasattr(writer, "stored_dtypes") else None
    stored = lossy.stored_dtypes() if lossy else {}
    assets = copy_assets(instruct.path, out_dir / "assets")
    # A trusted (allowlisted) instruct side may carry auto_map; the pack never does.
    config = strip_auto_map(instruct.config)
    (out_dir / "assets" / INSTRUCT_CONFIG).write_text(json.dumps(config, indent=2))
    indexes = [out_dir / f"{RESIDUAL_PREFIX}.safetensors.index.json", out_dir / FRAMES_INDEX]
    for extra in [*indexes, *(out_dir / "assets").iterdir()]:
        if extra.is_file():
            rel = extra.relative_to(out_dir).as_posix()
            files[rel] = file_entry(extra)
    manifest = ResidualManifest(
        key=key,
        method=method,
        dtype=manifest_dtype(dtype),
        tool_version=app.__version__,
        instruct=sources[0],
        base=sources[1],
        family=family_of(instruct.config),
        tied_embeddings=bool(instruct.config.get("tie_word_embeddings")),
        vocab=pairing.vocab_info(),
        tensors={
            j.spec.name: ResidualTensor(
                shape=j.spec.shape,
                dtype=stored.get(j.spec.name, manifest_dtype(j.spec.dtype)),
                common_rows=j.common_rows,
                norm=stats[j.spec.name].norm if j.spec.name in stats else 0.0,
                max_abs=stats[j.spec.name].max_abs if j.spec.name in stats else 0.0,
                corrections=writer.nonzero.get(j.spec.name)
                if isinstance(writer, FramedWriter)
                else None,
            )
            for j in jobs
        },
        copied=sorted(pairing.copied),
        special_tokens=special_tokens(instruct.path, instruct.config),
        assets=assets,
        files=files,
        fidelity=lossy.fidelity() if lossy else None,
    )
    write_json(out_dir / RESIDUAL_MANIFEST, manifest)
    return manifest


def manifest_dtype(dtype: DType) -> str:
    """``BF16`` -> ``bfloat16``."""
    return dtype.name
