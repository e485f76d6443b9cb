"""``target + alpha * R`` written one output shard at a time, by as many workers as
there are, then assembled: the same files, bit for bit, as :func:`apply_residual`.

A worker writes one shard (:func:`apply_shard`) into a directory of its own; once
every shard exists, one step (:func:`assemble_merged`) adds the index, config,
tokenizer files, manifest and model card beside them (or, when the shards are in an
object store, writes those files alone). The pack is verified by the workers between
them: each pack file by the first shard that reads it, or, where a worker fetched
the files it reads (:func:`shard_reads`), as each file is fetched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.core.errors import ArtifactCorruptError, CorruptCheckpointError
from app.residuals.apply import (
    applied_manifest,
    check_pack,
    finish_merged,
    merged_writer,
    open_pack,
    plan_apply,
)
from app.residuals.checkpoint import Checkpoint
from app.residuals.integrity import ReadVerifier
from app.residuals.manifest import (
    FileEntry,
    LineageInfo,
    MergeManifest,
    ResidualManifest,
    SourceInfo,
)
from app.residuals.plan import OutputShard, layout_digest, plan_output, shard_jobs
from app.residuals.shards import plan_shards, shard_files, write_index
from app.residuals.sources import RunOptions, make_runner
from app.residuals.tensorjobs import TensorJob


@dataclass(frozen=True)
class ShardOutput:
    """A written output shard: what the final step needs to list it in the manifest."""

    file: str
    size: int
    sha256: str
    xxh3_128: str | None = None


def plan_apply_shards(
    pack_dir: Path, target: Checkpoint, alpha: float, max_shard_bytes: int
) -> tuple[ResidualManifest, list[OutputShard]]:
    """The output shards of applying the pack at ``pack_dir`` to ``target`` (headers only).

    Raises:
        CorruptCheckpointError, ArtifactCorruptError: the pack is unreadable.
        IncompatibleModelsError: the target does not fit the residual.
    """
    manifest, pack = open_pack(pack_dir)
    with pack:
        jobs = plan_apply(manifest, pack, target, alpha)
    return manifest, plan_output([j.spec for j in jobs], max_shard_bytes)


def check_layout(jobs: list[TensorJob], max_shard_bytes: int, layout: str | None) -> None:
    """Refuse to write when the inputs as read here plan other files than the split's.

    Raises:
        ArtifactCorruptError: the layout differs (a header read on this node does not
            match the one the split was planned from).
    """
    if layout is not None and layout_digest([j.spec for j in jobs], max_shard_bytes) != layout:
        raise ArtifactCorruptError(
            "the residual pack and target as read on this node plan other output files than "
            "the split was planned with: a header changed in the store — nothing was "
            "published; check the inputs (`realign verify`) and submit the merge again",
            file="",
        )


def shard_reads(
    pack_dir: Path, target: Checkpoint, alpha: float, index: int, max_shard_bytes: int
) -> tuple[set[str], set[str]]:
    """The pack files and target files whose tensors output shard ``index`` reads
    (names relative to their directories; headers only). Pack files no shard reads
    are given to shard 0, so that every pack file is read whole by some shard.

    Raises:
        IncompatibleModelsError, CorruptCheckpointError: as :func:`plan_apply_shards`.
    """
    manifest, pack = open_pack(pack_dir)
    with pack:
        jobs = plan_apply(manifest, pack, target, alpha)
        shards = plan_output([j.spec for j in jobs], max_shard_bytes)
        if not 0 <= index < len(shards):
            raise CorruptCheckpointError(f"the merge has {len(shards)} output shards, no {index}")
        mine = shard_jobs(jobs, shards[index])
        reads = [s for j in mine for s in j.inputs]
        packs = {s.info.file.name for s in reads if s.checkpoint is pack}
        if index == 0:
            used = {s.info.file.name for j in jobs for s in j.inputs if s.checkpoint is pack}
            weights = (".frames",) if manifest.exact else (".safetensors",)
            packs |= {n for n in manifest.files if n.endswith(weights)} - used
    return packs, {s.info.file.name for s in reads if s.checkpoint is target}


def _verify_owned(
    pack_dir: Path,
    manifest: ResidualManifest,
    pack: Checkpoint,
    jobs: list[TensorJob],
    shards: list[OutputShard],
    index: int,
) -> None:
    """Check the pack files whose first reader is shard ``index``: every pack file is
    checked by exactly one shard's worker (hashing what it did not read itself), so
    between them the whole pack is checked once, before the final step publishes."""
    by_name = {j.spec.name: j for j in jobs}
    owner: dict[Path, int] = {}
    for shard in shards:
        for name in shard.tensors:
            for s in by_name[name].inputs:
                if s.checkpoint is pack:
                    owner.setdefault(s.info.file, shard.index)
    expected = {
        pack_dir / n: (e.size, e.checksum)
        for n, e in manifest.files.items()
        if e.checksum and owner.get(pack_dir / n) == index
    }
    if pack.verifier is not None:
        pack.verifier.close()
    pack.verifier = ReadVerifier(expected, manifest.key or str(pack_dir))


def apply_shard(
    pack_dir: Path,
    target: Checkpoint,
    out_dir: Path,
    *,
    alpha: float,
    index: int,
    opts: RunOptions,
    layout: str | None = None,
    pack_checked: bool = False,
) -> ShardOutput:
    """Write output shard ``index`` of ``target + alpha * R`` into the empty ``out_dir``.

    Args:
        pack_dir: a residual pack directory.
        target: the new base checkpoint.
        out_dir: an empty directory of this worker's.
        alpha: residual scale.
        index: which shard (0-based) of :func:`plan_apply_shards`.
        opts: device, progress, cancellation, shard size (must be the plan's).
        layout: the split's :func:`~app.residuals.plan.layout_digest`, checked first.
        pack_checked: the pack files this shard reads were checked whole already (as
            they were downloaded), so they are not hashed again.

    Raises:
        ArtifactCorruptError: a pack file this shard read does not match its sha256,
            or the inputs plan another layout.
        OperationCancelledError: cancelled; the caller discards ``out_dir``.
    """
    manifest, pack = open_pack(pack_dir)
    with pack:
        jobs = plan_apply(manifest, pack, target, alpha)
        shards = plan_output([j.spec for j in jobs], opts.max_shard_bytes)
        check_layout(jobs, opts.max_shard_bytes, layout)
        shard = shards[index]
        mine = shard_jobs(jobs, shard)
        if not pack_checked:
            _verify_owned(pack_dir, manifest, pack, jobs, shards, index)
        elif pack.verifier is not None:
            pack.verifier.close()  # nothing left to check: each file was, as it landed
            pack.verifier = None
        runner = make_runner(manifest.method, "apply", opts)
        with merged_writer(out_dir, [j.spec for j in jobs], opts, only=index) as writer:
            runner.run(mine, writer)
        check_pack(pack)  # nothing made from a corrupt pack gets published
    sha = writer.sha256.get(shard.file)
    if sha is None:
        raise ValueError("shard outputs must be hashed: run with opts.hash_outputs")
    return ShardOutput(shard.file, writer.sizes[shard.file], sha, writer.xxh3.get(shard.file))


def assemble_merged(
    out_dir: Path,
    pack_dir: Path,
    target: Checkpoint,
    *,
    target_src: SourceInfo,
    alpha: float,
    max_shard_bytes: int,
    outputs: list[ShardOutput],
    shards_here: bool = True,
    lineage: LineageInfo | None = None,
) -> MergeManifest:
    """Complete a model directory whose shards (``outputs``, all of them, in file
    order) are already in ``out_dir``: index, config, tokenizer files, manifest, card.
    With ``shards_here=False`` the shards are elsewhere (an object store's staging)
    and ``out_dir`` gets the other files only.

    Raises:
        ArtifactCorruptError: a shard is missing or not the size its writer reported.
    """
    manifest, pack = open_pack(pack_dir)
    with pack:
        jobs = plan_apply(manifest, pack, target, alpha)
    shards = plan_shards([j.spec for j in jobs], max_shard_bytes)
    files = shard_files("model", len(shards))
    if [o.file for o in outputs] != files:
        raise ValueError(f"shard outputs {[o.file for o in outputs]} are not the plan's {files}")
    for o in outputs if shards_here else ():
        path = out_dir / o.file
        if not path.is_file() or path.stat().st_size != o.size:
            raise ArtifactCorruptError(
                f"{o.file}: missing or not the {o.size} bytes its worker wrote; nothing was "
                "published — submit the merge again",
                file=o.file,
            )
    if len(files) > 1:
        write_index(out_dir, "model", files, shards)
    entries = {
        o.file: FileEntry(size=o.size, sha256=o.sha256, xxh3_128=o.xxh3_128) for o in outputs
    }
    merged = applied_manifest(manifest, target_src, alpha, entries, lineage)
    return finish_merged(
        out_dir, merged, target, pack_dir / "assets", dict(manifest.special_tokens)
    )
