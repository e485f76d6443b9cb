"""apply_residual and the one-pass fused merge: stream ``target + alpha * R`` into a
model directory that transformers and vLLM load as the instruct model's successor."""

from __future__ import annotations

import json
from pathlib import Path

import app
from app.core.errors import ArtifactCorruptError, CorruptCheckpointError, IncompatibleModelsError
from app.residuals.assets import INSTRUCT_CONFIG, copy_assets, merged_config, special_tokens
from app.residuals.card import render_card
from app.residuals.checkpoint import Checkpoint, TensorInfo, read_header
from app.residuals.compat import (
    check_family,
    check_tokenizers,
    family_of,
    pair_tensors,
    weight_tensors,
)
from app.residuals.dtypes import is_lossy
from app.residuals.framed import NEG, FramedPack
from app.residuals.integrity import ReadVerifier, mismatch_message
from app.residuals.manifest import (
    MERGE_MANIFEST,
    FamilyInfo,
    FileEntry,
    LineageInfo,
    MergeManifest,
    ResidualManifest,
    SourceInfo,
    VocabInfo,
    file_entry,
    read_residual_manifest,
    write_json,
    written_entries,
)
from app.residuals.shards import ShardedWriter, TensorSpec
from app.residuals.sources import RunOptions, file_order, make_runner
from app.residuals.tensorjobs import Source, TensorJob


def open_pack(pack_dir: Path, label: str | None = None) -> tuple[ResidualManifest, Checkpoint]:
    """Read a residual pack's manifest and shard headers, and check its small files.

    The returned checkpoint hashes its shards as they are read: call
    :func:`check_pack` once they have been read, before publishing anything made
    from them.

    Args:
        pack_dir: the pack directory.
        label: how integrity errors name the pack (default: its key or directory).

    Raises:
        CorruptCheckpointError: the manifest is missing or malformed.
        ArtifactCorruptError: a file is missing or does not match its sha256.
    """
    try:
        manifest = read_residual_manifest(pack_dir)
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"{pack_dir}: not a readable residual pack ({exc.__class__.__name__}: {exc})"
        ) from exc
    label = label or manifest.key or str(pack_dir)
    weights = (".frames",) if manifest.exact else (".safetensors",)
    shards = {n: e for n, e in manifest.files.items() if n.endswith(weights)}
    small = {
        pack_dir / n: (e.size, e.checksum)
        for n, e in manifest.files.items()
        if n not in shards and e.checksum
    }
    ReadVerifier(small, label).finish()
    config = json.loads((pack_dir / "assets" / INSTRUCT_CONFIG).read_text())
    expected = {pack_dir / n: (e.size, e.checksum) for n, e in shards.items() if e.checksum}
    if manifest.exact:
        pack = FramedPack.open_framed(
            pack_dir, config, label, verifier=ReadVerifier(expected, label)
        )
        missing = {n for n in manifest.tensors if n not in pack.tensors}
        if missing:
            raise CorruptCheckpointError(f"{pack_dir}: frames lack {sorted(missing)[0]}")
        return manifest, pack
    tensors: dict[str, TensorInfo] = {}
    for name in shards:
        try:
            tensors.update(read_header(pack_dir / name)[0])
        except (OSError, CorruptCheckpointError) as exc:
            raise ArtifactCorruptError(
                f"{mismatch_message(label, name)} ({exc})", file=name
            ) from exc
    verifier = ReadVerifier(expected, label)
    if is_lossy(manifest.dtype):  # decoded to fp32 R as read: plain apply jobs
        from app.residuals.coded import LossyPack  # numpy: only for lossy packs
        from app.residuals.lossy import lossy_format

        fmt = lossy_format(manifest.dtype)
        assert fmt is not None
        return manifest, LossyPack.open_lossy(pack_dir, config, tensors, manifest, fmt, verifier)
    missing = set(manifest.tensors) - set(tensors)
    if missing:
        raise CorruptCheckpointError(f"{pack_dir}: shards lack {sorted(missing)[0]}")
    return manifest, Checkpoint(pack_dir, config, tensors, verifier=verifier)


def check_pack(pack: Checkpoint) -> None:
    """Finish the integrity check of a pack opened by :func:`open_pack` (hashes the
    bytes nobody read, usually none).

    Raises:
        ArtifactCorruptError: a shard does not match its recorded checksum.
    """
    if pack.verifier is not None:
        pack.verifier.finish()


def _expected_target_shape(manifest: ResidualManifest, name: str) -> tuple[int, ...]:
    r = manifest.tensors[name]
    return (r.common_rows, *r.shape[1:]) if r.shape else r.shape


def match_target(
    family: FamilyInfo,
    expected: dict[str, tuple[int, ...]],
    copied: set[str],
    target: Checkpoint,
) -> dict[str, TensorInfo]:
    """Check that ``target`` fits a residual: same family, the residual's tensors (of
    the ``expected`` target shapes) plus the ``copied`` ones, nothing else.

    Returns:
        The target's weight tensors by name.

    Raises:
        IncompatibleModelsError: family, names or shapes do not match.
    """
    check_family(family, family_of(target.config), "the residual's models", "target")
    tensors = weight_tensors(target)
    covered = set(expected) | copied
    if set(tensors) != covered:
        extra, lack = sorted(set(tensors) - covered), sorted(covered - set(tensors))
        where = (
            f"target has {extra[0]} that the residual lacks"
            if extra
            else (f"target lacks {lack[0]} that the residual has")
        )
        raise IncompatibleModelsError(f"tensor names differ: {where} — not the same architecture")
    for name, want in expected.items():
        if tensors[name].shape != want:
            raise IncompatibleModelsError(
                f"{name}: target {tensors[name].shape} vs residual expects {want} — not the "
                "same architecture (or a different vocabulary than the residual's base)"
            )
    return tensors


def merged_order(combined: list[str], copied: set[str], target: dict[str, TensorInfo]) -> list[str]:
    """The tensor order of every merged model, whichever path writes it (so one content
    address always holds the same files): the residual's tensors in the instruct
    model's file order, then the tensors copied from the target, in its order."""
    return [*combined, *(n for n in file_order(target) if n in copied)]


def copy_job(target: Checkpoint, t: TensorInfo) -> TensorJob:
    """A tensor taken from the target as it is (non-float buffers)."""
    return TensorJob(TensorSpec(t.name, t.dtype, t.shape), "copy", (Source(target, t),), 0)


def plan_apply(
    manifest: ResidualManifest, pack: Checkpoint, target: Checkpoint, alpha: float
) -> list[TensorJob]:
    """Match the target's tensors against the residual.

    Raises:
        IncompatibleModelsError: family, names or shapes do not match.
    """
    expected = {name: _expected_target_shape(manifest, name) for name in manifest.tensors}
    tensors = match_target(manifest.family, expected, set(manifest.copied), target)
    jobs = []
    for name in merged_order(list(manifest.tensors), set(manifest.copied), tensors):
        t = tensors[name]
        if name in manifest.copied:
            jobs.append(copy_job(target, t))
            continue
        r = pack.tensors[name]
        common = manifest.tensors[name].common_rows
        if manifest.exact:  # (p, neg) stand for (instruct, base): the fused merge's bits
            inputs = (Source(pack, r), Source(pack, pack.tensors[name + NEG]), Source(target, t))
            jobs.append(
                TensorJob(TensorSpec(name, t.dtype, r.shape), "fused", inputs, common, alpha)
            )
            continue
        jobs.append(
            TensorJob(
                TensorSpec(name, t.dtype, r.shape),
                "apply",
                (Source(pack, r), Source(target, t)),
                common,
                alpha,
            )
        )
    return jobs


def plan_fused(
    instruct: Checkpoint, base: Checkpoint, target: Checkpoint, alpha: float
) -> tuple[list[TensorJob], VocabInfo | None]:
    """Preflight and plan of a one-pass merge; the target must share the base's layout."""
    check_family(family_of(instruct.config), family_of(base.config), "instruct", "base")
    check_family(family_of(base.config), family_of(target.config), "base", "target")
    pairing = pair_tensors(instruct, base)
    check_tokenizers(instruct.path, base.path)
    tensors, base_tensors = weight_tensors(target), weight_tensors(base)
    for name in sorted(set(tensors) | set(base_tensors)):
        t, b = tensors.get(name), base_tensors.get(name)
        if b is None or t is None or b.shape != t.shape:
            raise IncompatibleModelsError(
                f"{name}: target {t.shape if t else 'nothing'} vs base "
                f"{b.shape if b else 'nothing'} — not the same architecture"
            )
    combined = [n for n in file_order(instruct.tensors) if n in pairing.combine]
    jobs = []
    for name in merged_order(combined, set(pairing.copied), tensors):
        t, b = tensors[name], base_tensors[name]
        if name in pairing.copied:
            jobs.append(copy_job(target, t))
            continue
        i = pairing.combine[name][0]
        jobs.append(
            TensorJob(
                TensorSpec(name, t.dtype, i.shape),
                "fused",
                (Source(instruct, i), Source(base, b), Source(target, t)),
                pairing.common_rows[name],
                alpha,
            )
        )
    vocab = pairing.vocab_info()
    return jobs, vocab


def merged_writer(
    out_dir: Path, specs: list[TensorSpec], opts: RunOptions, only: int | None = None
) -> ShardedWriter:
    """The shard writer of a merged model (``model*.safetensors``, loadable by
    transformers); ``only``: just that output shard (see :class:`ShardedWriter`)."""
    return ShardedWriter(
        out_dir,
        specs,
        prefix="model",
        max_shard_bytes=opts.max_shard_bytes,
        hash_files=opts.hash_outputs,
        metadata={"realign": "merged"},
        only=only,
    )


def _write_merged(
    jobs: list[TensorJob], out_dir: Path, method: str, opts: RunOptions
) -> dict[str, FileEntry]:
    runner = make_runner(method, "apply", opts)
    with merged_writer(out_dir, [j.spec for j in jobs], opts) as writer:
        runner.run(jobs, writer)
    return written_entries(writer)


def finish_merged(
    out_dir: Path,
    manifest: MergeManifest,
    target: Checkpoint,
    assets_from: Path,
    tokens: dict[str, object],
) -> MergeManifest:
    """Config (the target's, with the instruct side's tokens and vocabulary), the
    instruct side's tokenizer and generation files, provenance and model card.

    Returns:
        ``manifest`` with the sha256 of those files (``other_files``), as written.
    """
    rows = manifest.vocab.instruct_rows if manifest.vocab else None
    config = merged_config(target.config, tokens, rows)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_assets(assets_from, out_dir)
    (out_dir / INSTRUCT_CONFIG).unlink(missing_ok=True)
    other = {
        f.name: file_entry(f)
        for f in sorted(out_dir.iterdir())
        if f.is_file() and f.name not in manifest.files
    }
    manifest = manifest.model_copy(update={"other_files": other})
    write_json(out_dir / MERGE_MANIFEST, manifest)
    (out_dir / "README.md").write_text(render_card(manifest))
    return manifest


def apply_residual(
    pack_dir: Path,
    target: Checkpoint,
    out_dir: Path,
    *,
    target_src: SourceInfo,
    alpha: float = 1.0,
    opts: RunOptions | None = None,
    lineage: LineageInfo | None = None,
) -> MergeManifest:
    """Write ``target + alpha * R`` (each element rounded once to the target's dtype) as a
    model directory into the empty ``out_dir``.

    Args:
        pack_dir: a residual pack directory.
        target: the new base checkpoint.
        out_dir: empty staging directory.
        target_src: identity of ``target`` for provenance.
        alpha: residual scale.
        opts: device, progress, cancellation, shard size, output hashing.
        lineage: figures of the lineage check, for the manifest.

    Raises:
        IncompatibleModelsError: the target does not fit the residual.
        OperationCancelledError: cancelled; the caller discards ``out_dir``.
    """
    opts = opts or RunOptions()
    manifest, pack = open_pack(pack_dir)
    with pack:
        jobs = plan_apply(manifest, pack, target, alpha)
        files = _write_merged(jobs, out_dir, manifest.method, opts)
        check_pack(pack)  # nothing made from a corrupt pack gets published
    merged = applied_manifest(manifest, target_src, alpha, files, lineage)
    return finish_merged(
        out_dir, merged, target, pack_dir / "assets", dict(manifest.special_tokens)
    )


def applied_manifest(
    manifest: ResidualManifest,
    target_src: SourceInfo,
    alpha: float,
    files: dict[str, FileEntry],
    lineage: LineageInfo | None = None,
) -> MergeManifest:
    """The provenance of ``target + alpha * R`` for the pack of ``manifest``, whoever
    wrote its ``files`` (one writer, or one worker per output shard)."""
    return MergeManifest(
        method=manifest.method,
        alpha=alpha,
        fused=False,
        residual_key=manifest.key,
        residual_dtype=manifest.dtype,
        instruct=manifest.instruct,
        base=manifest.base,
        target=target_src,
        tool_version=app.__version__,
        vocab=manifest.vocab,
        lineage=lineage,
        files=files,
    )


def merge_fused(
    instruct: Checkpoint,
    base: Checkpoint,
    target: Checkpoint,
    out_dir: Path,
    *,
    sources: tuple[SourceInfo, SourceInfo, SourceInfo],
    alpha: float = 1.0,
    method: str = "task_arithmetic",
    opts: RunOptions | None = None,
    lineage: LineageInfo | None = None,
) -> MergeManifest:
    """One pass ``target + alpha * (instruct - base)`` without materialising R.

    Args:
        sources: identities of (instruct, base, target).
        lineage: figures of the lineage check, for the manifest.

    Raises:
        IncompatibleModelsError, OperationCancelledError.
    """
    opts = opts or RunOptions()
    jobs, vocab = plan_fused(instruct, base, target, alpha)
    files = _write_merged(jobs, out_dir, method, opts)
    merged = MergeManifest(
        method=method,
        alpha=alpha,
        fused=True,
        residual_key=None,
        residual_dtype=None,
        instruct=sources[0],
        base=sources[1],
        target=sources[2],
        tool_version=app.__version__,
        vocab=vocab,
        lineage=lineage,
        files=files,
    )
    tokens = special_tokens(instruct.path, instruct.config)
    return finish_merged(out_dir, merged, target, instruct.path, tokens)
