"""A merge split by output shard: one task per shard, run by as many workers as there
are, then one final task that publishes the model.

The merge task plans the split (headers only) and queues the shard tasks as a group.
The plan holds references only (the residual key, the pinned target ref): each shard
task resolves them on its own node and reads only what its output shard needs (see
:mod:`app.jobs.shard_inputs`), writes its shard into the job's shard staging and
records its sha256; the task that records the last shard queues the final task,
which writes index, config, tokenizer files, manifest and card and publishes through
the store (on an object store by server-side copies of the staged shards, see
:mod:`app.jobs.split_publish`). The files are those of the single-task merge, byte
for byte. Cancellation, failure and worker loss end the whole job once (the first
ender wins, see :class:`SplitRecords`); nothing is published unless every shard was
written.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from app.core.errors import OperationCancelledError, RealignError
from app.jobs.failures import job_error, time_limit_message
from app.jobs.models import JobError, JobRecord, JobStage, JobStatus
from app.jobs.outcome import conclude, stored_outcome
from app.jobs.shard_inputs import open_inputs
from app.jobs.shard_records import ShardResult, SplitPlan, SplitRecords
from app.jobs.shard_staging import SHARDS, LocalShardStaging, ObjectShardStaging, ShardStaging
from app.jobs.split_plan import plan_split
from app.jobs.split_progress import ShardReporter
from app.jobs.split_publish import CANCELLED, FinalStep, publish_split
from app.residuals.apply_shard import ShardOutput, apply_shard
from app.residuals.sources import RunOptions
from app.store.base import Store
from app.store.objects import ObjectStore

if TYPE_CHECKING:
    from pathlib import Path

    from app.jobs.reporter import JobReporter
    from app.jobs.runner import JobRunner
    from app.residuals.checkpoint import Checkpoint
    from app.residuals.manifest import LineageInfo

log = logging.getLogger("app.jobs")


class ShardQueue(Protocol):
    """How shard tasks and the final task reach the workers (Celery, in production)."""

    def send_shards(self, job_id: str, count: int) -> None: ...
    def send_assemble(self, job_id: str) -> None: ...
    def revoke(self, job_id: str, count: int) -> None: ...


@dataclass(frozen=True)
class _Limit:
    """A shard task's stop signals: ``cancel`` (a cancel of the job, or the time limit)
    and ``timed_out`` (the time limit)."""

    cancel: threading.Event
    timed_out: threading.Event


class Fanout:
    """The split-merge steps of one worker.

    Args:
        runner: this worker's job runner (records, settings, final states).
        queue: where shard and final tasks go.
    """

    def __init__(self, runner: JobRunner, queue: ShardQueue) -> None:
        self.runner = runner
        self.records = runner.records
        self.settings = runner.settings
        self.queue = queue

    @property
    def store(self) -> Store:
        return self.runner.store  # the one store the runner's settings configure

    @property
    def staging(self) -> ShardStaging:
        st = self.store
        if isinstance(st, ObjectStore):  # workers on other machines: stage in the bucket
            return ObjectShardStaging(st.bucket, st.root / SHARDS)
        return LocalShardStaging(st.root / SHARDS)

    # -- merge task -----------------------------------------------------------------------
    def dispatch(self, rec: JobRecord, reporter: JobReporter, cancel: threading.Event) -> bool:
        """Split the job's merge when its output has enough shards: plan, queue the shard
        tasks, return True (the job stays running). False: run it as one task.
        """
        plan = plan_split(self.runner.job_spec(rec), self.settings, self.store, reporter, cancel)
        if plan is None:
            return False
        split = SplitRecords(self.records.kv, rec.id)
        plan = split.save_plan(plan)  # a redelivered merge task re-sends the same split
        rec = self.runner.move(reporter.rec, JobStatus.running, JobStage.apply)
        message = f"split into {len(plan.files)} shard tasks"
        self.records.add_event(rec, "log", message)
        self.queue.send_shards(rec.id, len(plan.files))
        return True

    # -- shard task -----------------------------------------------------------------------
    def run_shard(self, job_id: str, index: int) -> None:
        """Write output shard ``index`` of a split job (once, however often delivered).

        Raises:
            LeaseHeldError: another delivery of this shard is running; retry later.
        """
        from app.jobs.runner import LeaseHeldError

        split, rec, plan = self._open(job_id)
        if rec is None or plan is None:
            return
        if split.results(len(plan.files))[index] is None:
            if not split.acquire(index, self.runner.worker, self.runner.lease_s):
                raise LeaseHeldError(job_id)
            with self._leased(split, index) as limit:
                written = split.results(len(plan.files))[index] is not None  # meanwhile
                if not written and not self._write(split, rec, plan, index, limit):
                    return
        self._maybe_assemble(split, plan)

    def _write(
        self, split: SplitRecords, rec: JobRecord, plan: SplitPlan, index: int, limit: _Limit
    ) -> bool:
        done = split.deliveries(index)
        if done >= self.settings.max_deliveries:
            lost = JobError(
                code="worker_lost",
                message=f"{plan.files[index]}: delivered {done} times without being recorded "
                "(its worker died, or the job records could not be written each time) — "
                "check worker logs, memory and Redis before resubmitting",
            )
            self._end(split, JobStatus.failed, lost)
            return False
        split.count_delivery(index)
        try:
            out, fetched = self._write_shard(split, rec, plan, index, limit.cancel)
        except OperationCancelledError:
            if limit.timed_out.is_set():
                message = time_limit_message(self.settings.job_time_limit_s)
                self._end(split, JobStatus.failed, JobError(code="time_limit", message=message))
            else:
                self._end(split, JobStatus.cancelled, JobError(code="cancelled", message=CANCELLED))
            return False
        except Exception as exc:
            if self._stopped(split):  # the job ended meanwhile and its staging went
                self._end(split, JobStatus.cancelled, JobError(code="cancelled", message=CANCELLED))
            else:
                self._fail(split, rec, exc)
            return False
        worker = self.runner.worker
        split.record(index, ShardResult(**vars(out), worker=worker, fetched=fetched))
        read = f" ({fetched / 1e6:.1f} MB of inputs fetched)" if fetched else ""
        self.records.add_event(rec, "log", f"{out.file} written by {worker}{read}")
        return True

    def _write_shard(
        self,
        split: SplitRecords,
        rec: JobRecord,
        plan: SplitPlan,
        index: int,
        cancel: threading.Event,
    ) -> tuple[ShardOutput, int]:
        """Write the shard from the inputs it needs; returns it and the bytes fetched."""
        rate = self.settings.max_read_mbps
        opts = RunOptions(
            device=self.settings.device,
            progress=ShardReporter(self.records, split, rec, plan, index, cancel),
            cancel=cancel,
            max_shard_bytes=plan.max_shard_bytes,
            hash_outputs=True,
            max_read_bps=rate * 1e6 if rate else None,
        )
        with (
            self.staging.writing(rec.id) as tmp,
            open_inputs(plan, self.store, self.settings, tmp, index) as inputs,
        ):
            (tmp / "out").mkdir()
            out = apply_shard(
                inputs.pack_dir, inputs.target, tmp / "out", alpha=plan.alpha, index=index,
                opts=opts, layout=plan.layout, pack_checked=inputs.pack_checked,
            )  # fmt: skip
            if self._stopped(split):
                raise OperationCancelledError(CANCELLED)
            self.staging.put(rec.id, tmp / "out" / out.file)
        return out, inputs.fetched

    def _maybe_assemble(self, split: SplitRecords, plan: SplitPlan) -> None:
        if all(r is not None for r in split.results(len(plan.files))):
            self.queue.send_assemble(split.job_id)  # a duplicate finds the job finished

    # -- final task -----------------------------------------------------------------------
    def assemble(self, job_id: str) -> None:
        """Publish a split job's model once every shard is written, and end the job.

        Raises:
            LeaseHeldError: another delivery of the final task is running.
        """
        from app.jobs.lease import LeaseKeeper

        split, rec, plan = self._open(job_id)
        if rec is None or plan is None:
            return
        results = split.results(len(plan.files))
        if any(r is None for r in results):
            return  # the task that writes the last shard queues this one again
        # Renewed for as long as the publish takes (a large model's upload outlives any
        # fixed lease): a duplicate final task waits, then finds the split cleared.
        with LeaseKeeper(self.records, job_id, self.runner.worker, self.runner.lease_s) as lease:
            split, rec, plan = self._open(job_id)  # again, now that the lease is held
            if (
                rec is None
                or plan is None
                or any(r is None for r in split.results(len(plan.files)))
            ):
                return  # a duplicate: the first final task published and cleared it
            try:
                self._publish(split, rec, plan, [r for r in split.results(len(plan.files)) if r])
            except OperationCancelledError as exc:
                error = JobError(code="cancelled", message=str(exc) or CANCELLED)
                self._end(split, JobStatus.cancelled, error)
            except Exception as exc:
                if not lease.lost.is_set():  # the job is another holder's now: write nothing
                    self._fail(split, rec, exc)

    def _publish(
        self, split: SplitRecords, rec: JobRecord, plan: SplitPlan, results: list[ShardResult]
    ) -> None:
        rec = self.runner.move(rec, JobStatus.running, JobStage.publish)
        step = FinalStep(
            self.store, self.staging, self.settings, lambda: self._stopped(split),
            lineage=lambda pack_dir, tgt: plan.lineage or self._lineage(rec, pack_dir, tgt),
        )  # fmt: skip
        done = publish_split(step, rec.id, plan, results)
        outcome = stored_outcome(self.runner, rec, done)
        conclude(self.runner, self.records.get(rec.id) or rec, outcome)
        self.staging.discard(rec.id)
        split.clear(len(plan.files))

    def _lineage(self, rec: JobRecord, pack_dir: Path, target: Checkpoint) -> LineageInfo:
        """The lineage figures for the manifest (the job's preflight already refused an
        unrelated target): the target against the residual's base, where that is at hand."""
        from app.pipeline.context import Ctx
        from app.pipeline.lineage import check_pack_target
        from app.residuals.manifest import read_residual_manifest

        if isinstance(self.store, ObjectStore):  # this node holds the files' headers only
            from app.residuals.lineage import unmeasured

            why = (
                "split merge across nodes of a stored residual: the final task reads "
                "headers only, so the target was checked at validation where its base "
                "was at hand (the job's 'lineage:' event)"
            )
            limit = self.settings.lineage_max_distance
            return unmeasured(why, max_distance=limit, force=rec.spec.force)
        manifest = read_residual_manifest(pack_dir)
        ctx = Ctx(self.settings, self.store)
        return check_pack_target(ctx, manifest, target, force=rec.spec.force)

    # -- ending ---------------------------------------------------------------------------
    def _open(self, job_id: str) -> tuple[SplitRecords, JobRecord | None, SplitPlan | None]:
        """The split of a live job; (split, None, None) when there is nothing to do."""
        split = SplitRecords(self.records.kv, job_id)
        rec = self.records.get(job_id)
        if rec is None or rec.status.terminal:
            return split, None, None
        plan = split.plan()
        if plan is None:
            log.warning("job %s: a shard task without a split plan; dropping it", job_id)
            return split, None, None
        if self._stopped(split):
            if not self._publishing(split, plan):
                self._end(split, JobStatus.cancelled, JobError(code="cancelled", message=CANCELLED))
            # else it sees the cancel at its next check, and ends the job itself (before
            # its commit) or registers the model (after it)
            return split, None, None
        return split, rec, plan

    def _publishing(self, split: SplitRecords, plan: SplitPlan) -> bool:
        """Whether a final task of another worker may be publishing the job now: every
        shard is written and another holds the job's lease."""
        holder = self.records.lease_holder(split.job_id)
        if holder is None or holder == self.runner.worker:
            return False
        return all(r is not None for r in split.results(len(plan.files)))

    def _stopped(self, split: SplitRecords) -> bool:
        return self.records.cancel_requested(split.job_id) or split.ended() is not None

    def _fail(self, split: SplitRecords, rec: JobRecord, exc: Exception) -> None:
        if not isinstance(exc, RealignError):
            log.error("job %s: a shard task raised", rec.id, exc_info=exc)
        error = job_error(exc, rec.stage, self.settings.models_cache_dir, rec.id)
        self._end(split, JobStatus.failed, error)

    def end(self, split: SplitRecords, status: JobStatus, error: JobError | None) -> None:
        """End a split job from outside its tasks (see :meth:`_end`)."""
        self._end(split, status, error)

    def _end(self, split: SplitRecords, status: JobStatus, error: JobError | None) -> None:
        """End the job (the first ender's state wins), stop the other shard tasks and
        drop the staged shards.

        Also rewrites the final state when a shard task's progress write landed after
        it (every shard task stops through here once it sees the end)."""
        end = split.end(status, error)
        rec = self.records.get(split.job_id)
        if rec is not None and not rec.status.terminal:
            self.runner.finish(rec, end.status, error=end.error)
        plan = split.plan()
        if plan is not None:
            with contextlib.suppress(Exception):  # queued shard tasks also see the end
                self.queue.revoke(split.job_id, len(plan.files))
            split.forget_deliveries(len(plan.files))
        self.staging.discard(split.job_id)

    def sweep(self) -> list[str]:
        """Drop the staged shards of jobs that ended while a shard task was writing."""
        dropped = []
        for job_id in self.staging.jobs():
            split = SplitRecords(self.records.kv, job_id)
            rec = self.records.get(job_id)
            plan = split.plan()
            if rec is not None and not rec.status.terminal:
                continue
            if plan is not None and split.leased(len(plan.files)):
                continue
            self.staging.discard(job_id)
            if plan is not None:
                split.clear(len(plan.files))
            dropped.append(job_id)
        return dropped

    @contextlib.contextmanager
    def _leased(self, split: SplitRecords, index: int) -> Iterator[_Limit]:
        """Keep the shard's lease while the block runs (a dead holder's lapses); past
        ``REALIGN_JOB_TIME_LIMIT_S`` cancel the shard, and give the lease up two lease
        periods later if it still runs (see :class:`~app.jobs.lease.LeaseKeeper`)."""
        stop, limit = threading.Event(), _Limit(threading.Event(), threading.Event())
        holder, ttl = self.runner.worker, self.runner.lease_s
        ends = time.monotonic() + self.settings.job_time_limit_s

        def beat() -> float:  # the next renewal, or the time limit when it comes first
            left = ends - time.monotonic()
            return ttl / 3 if left <= 0 else min(ttl / 3, left)

        def keep() -> None:
            while not stop.wait(beat()):
                if time.monotonic() >= ends:
                    limit.timed_out.set()
                    limit.cancel.set()
                    if time.monotonic() >= ends + 2 * ttl:
                        return  # stuck: its lease lapses, the shard is delivered again
                with contextlib.suppress(Exception):  # Redis restarting: next beat
                    split.acquire(index, holder, ttl)

        keeper = threading.Thread(target=keep, daemon=True, name="realign-shard-lease")
        keeper.start()
        try:
            yield limit
        finally:
            stop.set()
            keeper.join()
            with contextlib.suppress(Exception):  # it expires on its own
                split.release(index, holder)
