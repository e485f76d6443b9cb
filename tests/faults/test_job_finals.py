"""Every job ends in a final state that stays: a records outage at any step of a job
(faults made by a real Redis refusing the record's writes) ends it ``failed`` with a
code once the records accept writes again; a final record is never overwritten (both
backends); a worker whose job ended elsewhere, or whose lease another holder took,
stops its merge without writing; the reaper ends jobs whose step stopped without an
outcome."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from app.core.settings import Settings, get_settings
from app.demo.tiny import TinyTriple
from app.jobs.kv import RedisKV
from app.jobs.models import Caller, JobError, JobRecord, JobStage, JobStatus, MergeSpec
from app.jobs.records import JobFinishedError, JobRecords
from app.jobs.runner import JobRunner
from app.jobs.service import JobService
from app.jobs.shard_records import ShardResult, SplitPlan, SplitRecords
from app.jobs.sqlite_kv import SqliteKV
from app.residuals.manifest import SourceInfo
from tests.jobs.conftest import RedisServer, Workers, service_env

ALICE = Caller(name="alice")


def pair(t: TinyTriple) -> MergeSpec:
    return MergeSpec(base=str(t.base), instruct=str(t.instruct), target=str(t.new_base))


@contextmanager
def records_refused(server: RedisServer, job_id: str) -> Iterator[None]:
    """The Redis server refuses (NOPERM) every write of job ``job_id``'s record key and
    nothing else: its lease, deliveries, events and indexes still work, as when one
    write fails in an outage. Reads keep working."""
    admin = redis.Redis.from_url(server.url)
    allowed = ["~[^r]*", "~realign:[^j]*", "~realign:jobs*", "~realign:job:*:*"]
    admin.execute_command("ACL", "SETUSER", "default", "resetkeys", "%R~*", *allowed)
    try:
        with pytest.raises(redis.ResponseError, match="no permissions"):
            admin.set(f"realign:job:{job_id}", "x")
        yield
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "resetkeys", "~*")
        admin.close()


def _status_events(records: JobRecords, job_id: str) -> list[JobStatus]:
    return [e.status for e in records.events(job_id) if e.kind == "status"]


def _wait(cond: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, what
        time.sleep(0.05)


# -- a records outage at each step ends the job, once the records are back --------------
def test_a_records_outage_as_the_merge_starts_ends_the_job(
    redis_server: RedisServer, llama_triple: TinyTriple, tmp_path: Path
) -> None:
    """The record cannot be written when the merge moves the job to 'running': the job
    used to stay 'queued' (deliveries=1) for good. Now it ends 'failed' with
    'records_unavailable' once the records are back, and is not run again."""
    records = JobRecords(RedisKV(redis_server.url))
    queued: list[str] = []
    runner = JobRunner(
        records, Settings(models_cache_dir=tmp_path / "store"), "w1", lambda t, j: queued.append(j)
    )
    rec = JobRecord(id="mrg_outage1", owner="alice", spec=pair(llama_triple))
    records.create(rec)
    runner.validate(rec.id)
    assert queued == [rec.id]
    with records_refused(redis_server, rec.id):
        runner.merge(rec.id)  # no exception for a dispatcher to swallow
        stuck = records.get(rec.id)
        assert stuck is not None and stuck.status == JobStatus.queued
        assert stuck.deliveries == 1
        runner.housekeeping()  # still refused: the final state waits, nothing breaks
    runner.housekeeping()
    done = records.get(rec.id)
    assert done is not None and done.status == JobStatus.failed, done
    assert done.error is not None and done.error.code == "records_unavailable"
    assert "Redis refused the write" in done.error.message
    runner.merge(rec.id)  # a redelivered message finds it final: no second delivery
    again = records.get(rec.id)
    assert again is not None and again.deliveries == 1 and again.status == JobStatus.failed
    assert list((tmp_path / "store").glob("merged/*")) == []


@pytest.mark.slow
def test_a_records_outage_in_a_celery_worker_ends_the_job(
    redis_server: RedisServer, llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    """A real worker meets a record it cannot write as it starts validating. It used to
    retry the task five times, then drop it, leaving the job 'queued' for good; now the
    job ends 'failed' 'records_unavailable' once Redis takes writes again (the worker's
    heartbeat writes it), without a retry and without a delivery counted."""
    env = service_env(redis_server.url, store_dir, [llama_triple.base.parent])
    settings = Settings(
        redis_url=redis_server.url,
        models_cache_dir=store_dir,
        allowed_roots=[llama_triple.base.parent],
        job_time_limit_s=8,
        visibility_timeout_s=10,
    )
    svc = JobService.from_settings(settings)
    workers = Workers(env, tmp_path)
    try:
        rec, _ = svc.submit(pair(llama_triple), ALICE)
        with records_refused(redis_server, rec.id):
            workers.start("refused")
            _wait(lambda: "could not be recorded" in workers.logs(), 60, workers.logs())
        _wait(lambda: svc.get(rec.id, ALICE).status.terminal, 40, workers.logs())
    finally:
        workers.stop_all()
    job = svc.get(rec.id, ALICE)
    assert job.status == JobStatus.failed and job.deliveries == 0, job
    assert job.error is not None and job.error.code == "records_unavailable", job.error
    assert "Retry in" not in workers.logs()


# -- final records stay final -------------------------------------------------------------
@pytest.fixture(params=["sqlite", "redis"])
def records(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobRecords]:
    if request.param == "sqlite":
        yield JobRecords(SqliteKV(tmp_path / "jobs.sqlite"))
        return
    server = RedisServer(tmp_path / "redis")
    server.workdir.mkdir()
    server.start()
    try:
        yield JobRecords(RedisKV(server.url))
    finally:
        server.stop()


def test_a_final_record_is_never_overwritten(records: JobRecords) -> None:
    rec = JobRecord(id="mrg_final", owner="alice", spec=MergeSpec(base="/b", instruct="/i"))
    records.create(rec)
    running = records.save(rec.model_copy(update={"status": JobStatus.running}))
    error = JobError(code="worker_lost", message="reaped")
    records.save(running.model_copy(update={"status": JobStatus.failed, "error": error}))
    for late in (JobStatus.running, JobStatus.succeeded, JobStatus.cancelled):
        with pytest.raises(JobFinishedError, match="mrg_final"):
            records.save(running.model_copy(update={"status": late, "error": None}))
    kept = records.get(rec.id)
    assert kept is not None and kept.status == JobStatus.failed and kept.error == error
    counts = records.count_by_status()
    assert counts["failed"] == 1 and counts["running"] == 0 and counts["succeeded"] == 0


@pytest.fixture
def slow_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Merges read at 1 MB/s (a few seconds for a tiny model): time to act mid-merge."""
    monkeypatch.setenv("REALIGN_MAX_READ_MBPS", "1")
    get_settings.cache_clear()
    yield
    monkeypatch.delenv("REALIGN_MAX_READ_MBPS")
    get_settings.cache_clear()


def _slow_merge(tmp_path: Path, llama_triple: TinyTriple, **settings: object) -> tuple[
    JobRecords, Settings, JobRecord, threading.Thread
]:  # fmt: skip
    """A merge running in a thread (reads throttled: it lasts seconds), mid-merge."""
    records = JobRecords(SqliteKV(tmp_path / "jobs.sqlite"))
    s = Settings(models_cache_dir=tmp_path / "store", **settings)  # type: ignore[arg-type]
    runner = JobRunner(records, s, "w1", lambda t, j: None)
    rec = JobRecord(id="mrg_slow", owner="alice", spec=pair(llama_triple))
    records.create(rec)
    runner.validate(rec.id)
    thread = threading.Thread(target=runner.merge, args=(rec.id,))
    thread.start()

    def merging() -> bool:
        got = records.get(rec.id)
        return got is not None and got.progress is not None and got.progress.bytes_done > 0

    _wait(merging, 60, "the merge never made progress")
    return records, s, rec, thread


def test_a_job_reaped_while_its_worker_lives_stays_failed(
    llama_triple: TinyTriple, tmp_path: Path, slow_reads: None
) -> None:
    """The lease lapsed (a Redis blip) and another worker's reaper failed the job: the
    live worker used to write 'running', then 'succeeded' over it (SSE clients had
    stopped at 'failed'). Now its next write is refused, it stops its merge, and the
    job stays failed with nothing registered or published."""
    records, settings, rec, thread = _slow_merge(
        tmp_path, llama_triple, job_lease_s=30, max_deliveries=1
    )
    records.kv.delete(f"realign:job:{rec.id}:lease")  # lapsed
    assert JobRunner(records, settings, "w2", lambda t, j: None).reap() == [rec.id]
    thread.join(timeout=60)
    assert not thread.is_alive()
    job = records.get(rec.id)
    assert job is not None and job.status == JobStatus.failed, job
    assert job.error is not None and job.error.code == "worker_lost"
    assert _status_events(records, rec.id)[-1] == JobStatus.failed
    assert records.models() == [] and list((tmp_path / "store").glob("merged/*")) == []


def test_a_worker_that_lost_its_lease_stops_without_writing(
    llama_triple: TinyTriple, tmp_path: Path, slow_reads: None
) -> None:
    """Another holder took the lease (its delivery owns the job now): the worker stops
    its merge at the next progress check and writes neither 'cancelled' nor
    'succeeded'; the other holder's lease stays."""
    records, _, rec, thread = _slow_merge(tmp_path, llama_triple, job_lease_s=1.5)
    records.kv.set(f"realign:job:{rec.id}:lease", "w2", ex=60)  # taken over
    seen = len(records.events(rec.id))
    thread.join(timeout=60)
    assert not thread.is_alive()
    job = records.get(rec.id)
    assert job is not None and job.status == JobStatus.running, job
    assert records.lease_holder(rec.id) == "w2"
    later = records.events(rec.id, seen)
    assert [e for e in later if e.kind == "status"] == [], later
    assert records.models() == [] and list((tmp_path / "store").glob("merged/*")) == []


# -- the reaper ends steps that stopped without an outcome --------------------------------
def test_the_reaper_ends_stalled_validations_only(tmp_path: Path) -> None:
    """A job left 'validating' (its worker died mid-preflight, or its record write
    failed) with no lease is failed once stale; a job only waiting in the queue, and a
    validation whose worker still holds the lease, are left alone."""
    records = JobRecords(SqliteKV(tmp_path / "jobs.sqlite"))
    settings = Settings(models_cache_dir=tmp_path / "store", job_lease_s=0.5)
    runner = JobRunner(records, settings, "w1", lambda t, j: None)
    spec = MergeSpec(base="/b", instruct="/i")
    for job_id, status in (
        ("mrg_dead", JobStatus.validating),
        ("mrg_live", JobStatus.validating),
        ("mrg_waiting", JobStatus.queued),
    ):
        rec = JobRecord(id=job_id, owner="alice", spec=spec, status=status)
        records.create(rec.model_copy(update={"stage": JobStage.preflight}))
    records.acquire_lease("mrg_live", "w9", 60)
    time.sleep(0.7)
    assert runner.reap() == ["mrg_dead"]
    dead = records.get("mrg_dead")
    assert dead is not None and dead.status == JobStatus.failed
    assert dead.error is not None and dead.error.code == "worker_lost"
    assert "validation stopped" in dead.error.message
    for job_id, status in (("mrg_live", "validating"), ("mrg_waiting", "queued")):
        got = records.get(job_id)
        assert got is not None and got.status.value == status


def _split_job(
    records: JobRecords, job_id: str, stage: JobStage, files: list[str]
) -> tuple[JobRecord, SplitRecords]:
    """A running job split into ``files`` output shards (its plan only references)."""
    rec = JobRecord(
        id=job_id, owner="alice", spec=MergeSpec(base="/b", instruct="/i", target="/t"),
        status=JobStatus.running, stage=stage,
    )  # fmt: skip
    records.create(rec)
    split = SplitRecords(records.kv, job_id)
    target = SourceInfo(ref="/t", path="/t", digest="d", files={})
    split.save_plan(
        SplitPlan(
            residual_key="r" * 32, target="/t", target_src=target, alpha=1.0,
            merged_key="m" * 32, max_shard_bytes=1, layout="l", files=files,
            nbytes=[1] * len(files), tensors=[1] * len(files),
        )
    )  # fmt: skip
    return rec, split


def test_the_reaper_leaves_a_split_job_to_its_shard_tasks(tmp_path: Path) -> None:
    """The merge task that split a job returned once it queued the shard tasks, giving up
    the job's lease: the job (its one allowed delivery counted) is theirs to end, and is
    not failed as a dead worker's; once the split ended without ending it, it is."""
    records = JobRecords(SqliteKV(tmp_path / "jobs.sqlite"))
    settings = Settings(models_cache_dir=tmp_path / "store", job_lease_s=0.5, max_deliveries=1)
    runner = JobRunner(records, settings, "w1", lambda t, j: None)
    rec, split = _split_job(records, "mrg_split", JobStage.apply, ["a", "b"])
    records.count_delivery(rec.id)
    time.sleep(0.7)
    assert runner.reap() == []
    split.end(JobStatus.failed, JobError(code="x", message="ended, record not written"))
    assert runner.reap() == [rec.id]


def test_a_merge_past_its_time_limit_fails_and_publishes_nothing(
    llama_triple: TinyTriple, tmp_path: Path, slow_reads: None
) -> None:
    """Workers run tasks in their main thread, where Celery's time limits never fire: the
    job's lease keeper stops the merge at REALIGN_JOB_TIME_LIMIT_S instead."""
    records, _, rec, thread = _slow_merge(tmp_path, llama_triple, job_time_limit_s=2)
    thread.join(timeout=60)
    assert not thread.is_alive()
    job = records.get(rec.id)
    assert job is not None and job.status == JobStatus.failed, job
    assert job.error is not None and job.error.code == "time_limit", job.error
    assert "REALIGN_JOB_TIME_LIMIT_S (2 s)" in job.error.message
    assert records.lease_holder(rec.id) is None
    assert records.models() == [] and list((tmp_path / "store").glob("merged/*")) == []


class _Sent:
    """Where a Fanout's task messages go in this test (recorded, nothing runs them)."""

    def __init__(self) -> None:
        self.revoked: list[str] = []

    def send_shards(self, job_id: str, count: int) -> None: ...
    def send_assemble(self, job_id: str) -> None: ...

    def revoke(self, job_id: str, count: int) -> None:
        self.revoked.append(job_id)


def test_a_cancel_during_a_split_publish_is_left_to_the_final_task(tmp_path: Path) -> None:
    """A duplicate final (or shard) task that sees a cancel while the first final task
    holds the job's lease and publishes must not end the job, nor drop the staged
    shards under it: the publisher ends it (or registers the model, past its commit)."""
    from app.jobs.fanout import Fanout

    records = JobRecords(SqliteKV(tmp_path / "jobs.sqlite"))
    settings = Settings(models_cache_dir=tmp_path / "store")
    sent = _Sent()
    fanout = Fanout(JobRunner(records, settings, "w2", lambda t, j: None, shards=sent), sent)
    rec, split = _split_job(records, "mrg_pub", JobStage.publish, ["a"])
    split.record(0, ShardResult(file="a", size=1, sha256="0" * 64, worker="w1"))
    records.acquire_lease(rec.id, "w1", 60)  # every shard written: w1's final task publishes
    records.request_cancel(rec.id)
    fanout.assemble(rec.id)  # a duplicate final task on w2
    job = records.get(rec.id)
    assert job is not None and job.status == JobStatus.running
    assert SplitRecords(records.kv, rec.id).ended() is None and sent.revoked == []
    records.release_lease(rec.id, "w1")  # w1 died before ending it: the next one ends it
    fanout.assemble(rec.id)
    job = records.get(rec.id)
    assert job is not None and job.status == JobStatus.cancelled


def test_a_cancel_seen_by_a_shard_task_ends_the_job_while_shards_remain(
    tmp_path: Path,
) -> None:
    """Shards are still to be written, and some other holder has the job's lease (the
    merge task right after it queued the shards, a housekeeping pass): no final task can
    be publishing, so the shard task that sees the cancel ends the job."""
    from app.jobs.fanout import Fanout

    records = JobRecords(SqliteKV(tmp_path / "jobs.sqlite"))
    settings = Settings(models_cache_dir=tmp_path / "store")
    sent = _Sent()
    fanout = Fanout(JobRunner(records, settings, "w2", lambda t, j: None, shards=sent), sent)
    rec, _ = _split_job(records, "mrg_cut", JobStage.apply, ["a", "b"])
    records.acquire_lease(rec.id, "w1", 60)
    records.request_cancel(rec.id)
    fanout.run_shard(rec.id, 1)
    job = records.get(rec.id)
    assert job is not None and job.status == JobStatus.cancelled
    assert sent.revoked == [rec.id]
