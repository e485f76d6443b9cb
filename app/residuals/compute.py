"""compute_residual: stream ``instruct - base`` into a residual pack."""

from __future__ import annotations

import json
from pathlib import Path

import app
from app.residuals.assets import INSTRUCT_CONFIG, copy_assets, special_tokens
from app.residuals.checkpoint import Checkpoint
from app.residuals.compat import check_family, check_tokenizers, family_of, pair_tensors
from app.residuals.dtypes import BF16, DType
from app.residuals.hashing import sha256_file
from app.residuals.manifest import (
    RESIDUAL_MANIFEST,
    FileEntry,
    ResidualManifest,
    ResidualTensor,
    SourceInfo,
    write_json,
)
from app.residuals.shards import ShardedWriter, TensorSpec
from app.residuals.sources import RunOptions, file_order, make_runner
from app.residuals.stream import Source, TensorJob

RESIDUAL_PREFIX = "residual"


def preflight_residual(instruct: Checkpoint, base: Checkpoint) -> None:
    """All checks of a residual computation that need no tensor data."""
    check_family(family_of(instruct.config), family_of(base.config), "instruct", "base")
    pair_tensors(instruct, base)
    check_tokenizers(instruct.path, base.path)


def compute_residual(
    instruct: Checkpoint,
    base: Checkpoint,
    out_dir: Path,
    *,
    instruct_src: SourceInfo,
    base_src: SourceInfo,
    dtype: DType = BF16,
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
        dtype: storage dtype of R (float32 is lossless; bfloat16 halves the size).
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
    check_family(family_of(instruct.config), family_of(base.config), "instruct", "base")
    pairing = pair_tensors(instruct, base)
    check_tokenizers(instruct.path, base.path)
    order = [n for n in file_order(instruct.tensors) if n in pairing.combine]
    jobs = [
        TensorJob(
            spec=TensorSpec(name, dtype, pairing.combine[name][0].shape),
            kind="residual",
            inputs=(
                Source(instruct, pairing.combine[name][0]),
                Source(base, pairing.combine[name][1]),
            ),
            common_rows=pairing.common_rows[name],
        )
        for name in order
    ]
    runner = make_runner(method, "residual", opts)
    with ShardedWriter(
        out_dir,
        [j.spec for j in jobs],
        prefix=RESIDUAL_PREFIX,
        max_shard_bytes=opts.max_shard_bytes,
    ) as writer:
        stats = runner.run(jobs, writer)
    files = {n: FileEntry(size=writer.sizes[n], sha256=h) for n, h in writer.sha256.items()}
    index = out_dir / f"{RESIDUAL_PREFIX}.safetensors.index.json"
    assets = copy_assets(instruct.path, out_dir / "assets")
    (out_dir / "assets" / INSTRUCT_CONFIG).write_text(json.dumps(instruct.config, indent=2))
    for extra in [index, *(out_dir / "assets").iterdir()]:
        if extra.is_file():
            rel = extra.relative_to(out_dir).as_posix()
            files[rel] = FileEntry(size=extra.stat().st_size, sha256=sha256_file(extra))
    vocab = pairing.vocab_info()
    manifest = ResidualManifest(
        key=key,
        method=method,
        dtype=manifest_dtype(dtype),
        tool_version=app.__version__,
        instruct=instruct_src,
        base=base_src,
        family=family_of(instruct.config),
        tied_embeddings=bool(instruct.config.get("tie_word_embeddings")),
        vocab=vocab,
        tensors={
            j.spec.name: ResidualTensor(
                shape=j.spec.shape,
                dtype=manifest_dtype(dtype),
                common_rows=j.common_rows,
                norm=stats[j.spec.name].norm if j.spec.name in stats else 0.0,
                max_abs=stats[j.spec.name].max_abs if j.spec.name in stats else 0.0,
            )
            for j in jobs
        },
        copied=sorted(pairing.copied),
        special_tokens=special_tokens(instruct.path, instruct.config),
        assets=assets,
        files=files,
    )
    write_json(out_dir / RESIDUAL_MANIFEST, manifest)
    return manifest


def manifest_dtype(dtype: DType) -> str:
    """``BF16`` -> ``bfloat16``."""
    return dtype.name
