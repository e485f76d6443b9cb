"""The final task of a split merge: publish the model whose shards the shard tasks
staged, with the size and sha256 each shard task recorded.

Local store: the staged shards are linked into the store's staging directory beside
the index, config, tokenizer files, manifest and model card, and the directory is
published as one.

Object store: no byte of the weights passes through the final task. It writes the
small files from headers alone (see :mod:`app.jobs.shard_inputs`), then, under the
build lock, copies each staged shard on the server into the model's staging prefix
(CopyObject; UploadPartCopy parts above 5 GB), uploads the small files beside them
and commits: copies into place, commit marker last.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import OperationCancelledError
from app.core.settings import Settings
from app.jobs.shard_inputs import open_inputs
from app.jobs.shard_records import ShardResult, SplitPlan
from app.jobs.shard_staging import ObjectShardStaging, ShardStaging
from app.pipeline.stored import StoredMerge
from app.residuals.apply_shard import ShardOutput, assemble_merged
from app.residuals.checkpoint import Checkpoint
from app.residuals.hashing import sha256_file
from app.residuals.manifest import MERGE_MANIFEST, LineageInfo, read_merge_manifest
from app.store.base import Store
from app.store.objects import ObjectStore
from app.store.s3 import relative_files

CANCELLED = "cancelled; nothing was published"
COPIES = 8  # server-side copies in flight (each a request the store serves alone)


@dataclass(frozen=True)
class FinalStep:
    """What the final task publishes with.

    Args:
        store: this node's store.
        staging: where the shard tasks staged the shards.
        settings: this worker's settings.
        stopped: whether the job was cancelled or ended meanwhile.
    """

    store: Store
    staging: ShardStaging
    settings: Settings
    stopped: Callable[[], bool]
    lineage: Callable[[Path, Checkpoint], LineageInfo | None] = lambda pack_dir, target: None

    def check(self) -> None:
        if self.stopped():
            raise OperationCancelledError(CANCELLED)


def publish_split(
    step: FinalStep, job_id: str, plan: SplitPlan, results: list[ShardResult]
) -> StoredMerge:
    """Publish the split's model (once; a model already published wins).

    Raises:
        OperationCancelledError: the job was cancelled before the commit, or during it
            (then the model is stored, but not handed out).
        ArtifactCorruptError: a staged shard is missing or not the size recorded.
    """
    outputs = [ShardOutput(r.file, r.size, r.sha256, r.xxh3_128) for r in results]
    if isinstance(step.store, ObjectStore):
        assert isinstance(step.staging, ObjectShardStaging)
        done = _publish_remote(step, step.store, step.staging, job_id, plan, outputs)
    else:
        done = _publish_local(step, job_id, plan, outputs)
    if step.stopped():  # cancelled during the upload: stored, but not handed out
        raise OperationCancelledError(
            f"cancelled while the model was published: it is stored as merged/{done.key} "
            "but neither registered nor served"
        )
    return done


def _publish_local(
    step: FinalStep, job_id: str, plan: SplitPlan, outputs: list[ShardOutput]
) -> StoredMerge:
    st = step.store
    with (
        step.staging.writing(job_id) as scratch,
        open_inputs(plan, st, step.settings, scratch, None) as inputs,
    ):

        def build(tmp: Path) -> None:
            for o in outputs:
                step.staging.take(job_id, o.file, tmp / o.file, o.size, o.sha256)
            assemble_merged(
                tmp, inputs.pack_dir, inputs.target, target_src=plan.target_src,
                alpha=plan.alpha, max_shard_bytes=plan.max_shard_bytes, outputs=outputs,
                lineage=step.lineage(inputs.pack_dir, inputs.target),
            )  # fmt: skip
            step.check()  # the last moment a cancel still stops it

        created = st.get_or_build(plan.merged_key, build, kind="merged", keep=(plan.residual_key,))
    with st.using(plan.merged_key, "merged") as path:
        manifest = read_merge_manifest(path)
    return StoredMerge(plan.merged_key, path, manifest, plan.residual_key, False, created)


def _publish_remote(
    step: FinalStep,
    st: ObjectStore,
    staging: ObjectShardStaging,
    job_id: str,
    plan: SplitPlan,
    outputs: list[ShardOutput],
) -> StoredMerge:
    with staging.writing(job_id) as scratch:
        out = scratch / "model"
        out.mkdir()
        with open_inputs(plan, st, step.settings, scratch, None) as inputs:
            manifest = assemble_merged(
                out, inputs.pack_dir, inputs.target, target_src=plan.target_src,
                alpha=plan.alpha, max_shard_bytes=plan.max_shard_bytes, outputs=outputs,
                shards_here=False, lineage=step.lineage(inputs.pack_dir, inputs.target),
            )  # fmt: skip

        def stage(prefix: str) -> dict[str, tuple[int, str]]:
            files = {o.file: (o.size, o.sha256) for o in outputs}
            with ThreadPoolExecutor(max_workers=COPIES) as pool:
                list(pool.map(lambda o: staging.copy_to(job_id, o.file, f"{prefix}/{o.file}",
                                                        o.size), outputs))  # fmt: skip
            for rel in relative_files(out):
                staging.upload(out / rel, f"{prefix}/{rel}")
                files[rel] = ((out / rel).stat().st_size, sha256_file(out / rel))
            step.check()  # the last moment a cancel still stops it
            return files

        created = st.publish_staged(plan.merged_key, stage, "merged", keep=(plan.residual_key,))
        if not created:  # another builder's: its manifest, checked against its marker
            (scratch / MERGE_MANIFEST).write_text(
                st.read_text(plan.merged_key, MERGE_MANIFEST, "merged")
            )
            manifest = read_merge_manifest(scratch)
    path = st.path(plan.merged_key, "merged")  # fetched into a node's cache when read
    return StoredMerge(plan.merged_key, path, manifest, plan.residual_key, False, created)
