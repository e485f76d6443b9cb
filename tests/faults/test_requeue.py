"""A job whose queue message is lost never stays ``queued``: worker housekeeping sends it
again (a job event says so) and the job runs; one whose messages keep getting lost fails
``message_lost`` after ``REALIGN_MAX_DELIVERIES`` re-sends; a job waiting in a queue (its
message is there) is left alone. Real Redis, real ``celery worker`` processes; the
broker losing a message is a real ``DEL`` of its queue list in Redis."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
import redis

from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from app.jobs.broker import TASK_ASSEMBLE, UNACKED, jobs_in_broker, queue_keys
from app.jobs.models import Caller, JobRecord, JobStage, JobStatus, MergeSpec
from app.jobs.records import JobRecords
from app.jobs.requeue import MESSAGE_LOST
from app.jobs.runner import JobRunner
from app.jobs.service import JobService
from app.jobs.sqlite_kv import SqliteKV
from tests.jobs.conftest import RedisServer, Workers, service_env

ALICE = Caller(name="alice")
# The documented timing knob (REALIGN_JOB_REQUEUE_AFTER_S), short so the test does not
# wait minutes; housekeeping itself runs on every worker heartbeat (10 s).
AFTER_S = 2.0
RESENT = "message re-sent"


def _spec(t: TinyTriple) -> MergeSpec:
    return MergeSpec(base=str(t.base), instruct=str(t.instruct), target=str(t.new_base))


def _resent(svc: JobService, job_id: str) -> list[str]:
    return [e.message for e in svc.events(job_id, ALICE) if e.message.startswith(RESENT)]


def _until(what: str, check: Callable[[], bool], workers: Workers, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}\n{workers.logs()}"
        time.sleep(0.1)


@pytest.fixture
def cluster(
    redis_server: RedisServer, llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> Iterator[tuple[JobService, Workers, redis.Redis]]:
    """The job service (no worker yet), a worker starter and a client of the broker."""
    roots = [llama_triple.base.parent]
    after = str(AFTER_S)
    env = service_env(redis_server.url, store_dir, roots, REALIGN_JOB_REQUEUE_AFTER_S=after)
    settings = Settings(
        redis_url=redis_server.url,
        models_cache_dir=store_dir,
        allowed_roots=roots,
        job_time_limit_s=8,
        visibility_timeout_s=10,
    )
    workers = Workers(env, tmp_path)
    broker = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield JobService.from_settings(settings), workers, broker
    finally:
        workers.stop_all()


@pytest.mark.slow
def test_lost_messages_are_sent_again_and_the_job_succeeds(
    cluster: tuple[JobService, Workers, redis.Redis], llama_triple: TinyTriple
) -> None:
    """The validate message is lost before any worker took it, then the merge message
    after validation: housekeeping sends each again and the job succeeds."""
    svc, workers, broker = cluster
    rec, _ = svc.submit(_spec(llama_triple), ALICE)
    assert jobs_in_broker(broker) == {rec.id}  # the probe sees the waiting message
    broker.delete(*queue_keys("cpu"))  # the broker loses it
    assert jobs_in_broker(broker) == set()
    workers.start("light", queues="cpu")  # validates; nothing takes merges yet

    def validated() -> bool:
        job = svc.get(rec.id, ALICE)
        return job.status == JobStatus.queued and job.stage == JobStage.preflight

    _until("the re-sent validation", validated, workers)
    assert len(_resent(svc, rec.id)) == 1
    _until("the merge message", lambda: broker.llen("gpu") == 1, workers)
    broker.delete(*queue_keys("gpu"))  # lost too
    _until("the merge message re-sent", lambda: len(_resent(svc, rec.id)) == 2, workers)
    workers.start("heavy", queues="gpu")
    _until("the merge", lambda: svc.get(rec.id, ALICE).status.terminal, workers)
    job = svc.get(rec.id, ALICE)
    assert job.status == JobStatus.succeeded, (job.error, workers.logs())
    first, second = _resent(svc, rec.id)
    assert "no validate message" in first and "re-send 1 of 3" in first
    assert "no merge message" in second and "re-send 2 of 3" in second
    assert job.deliveries == 1  # a re-send is not a delivery


@pytest.mark.slow
def test_a_waiting_job_is_left_alone_and_one_always_lost_fails(
    cluster: tuple[JobService, Workers, redis.Redis], llama_triple: TinyTriple
) -> None:
    """No worker takes validations: the job's message waits in the queue and is never
    re-sent. Then the broker loses every message sent to that queue: after three
    re-sends the job fails 'message_lost' instead of staying queued."""
    svc, workers, broker = cluster
    rec, _ = svc.submit(_spec(llama_triple), ALICE)
    workers.start("heavy", queues="gpu")  # runs housekeeping, takes no validations
    _wait_beats(svc, workers, since=time.time() + AFTER_S, beats=2)
    assert svc.get(rec.id, ALICE).status == JobStatus.queued
    assert _resent(svc, rec.id) == [] and jobs_in_broker(broker) == {rec.id}

    stop = threading.Event()

    def lose() -> None:  # a broker that drops everything sent to "cpu"
        while not stop.wait(0.05):
            broker.delete(*queue_keys("cpu"))

    loser = threading.Thread(target=lose, daemon=True)
    loser.start()
    try:
        # ~8 heartbeats of 10 s (each re-send noted, then confirmed, then the failing
        # sweep): room for a slow machine's late beats
        _until("the job to end", lambda: svc.get(rec.id, ALICE).status.terminal, workers, 240)
    finally:
        stop.set()
        loser.join()
    job = svc.get(rec.id, ALICE)
    assert job.status == JobStatus.failed and job.error is not None, job
    assert job.error.code == MESSAGE_LOST
    assert "lost 4 times" in job.error.message and "broker" in job.error.message
    assert len(_resent(svc, rec.id)) == 3


def _wait_beats(svc: JobService, workers: Workers, since: float, beats: int) -> None:
    """Until a worker has beaten ``beats`` times after ``since`` (epoch seconds); the
    housekeeping of every beat but the last has run by then."""
    seen: set[float] = set()

    def beat() -> bool:
        for w in svc.records.workers():
            if w.seen_at.timestamp() > since:
                seen.add(w.seen_at.timestamp())
        return len(seen) >= beats

    _until(f"{beats} worker heartbeats", beat, workers)


# -- the sweep on embedded records (no broker: the step queue is a list) -----------------
PERIOD = 3.0  # the two sweeps of one period must run within it on a busy machine


def test_resend_once_per_period_then_fail(tmp_path: Path) -> None:
    """One re-send per period, even with two workers sweeping; a job already taken or
    with its message present is left alone; past the cap the job fails."""
    settings = Settings(models_cache_dir=tmp_path / "store", job_requeue_after_s=PERIOD)
    records = JobRecords(SqliteKV(tmp_path / "jobs.sqlite"))
    sent: list[tuple[str, str]] = []
    present: set[str] = set()

    def runner(name: str) -> JobRunner:
        return JobRunner(
            records, settings, name, lambda t, j: sent.append((t, j)), None, lambda: present
        )

    w1, w2 = runner("w1"), runner("w2")
    lost, waiting = (
        JobRecord(id=i, owner="alice", spec=MergeSpec(residual="ab"))
        for i in ("mrg_lost", "mrg_wait")
    )
    for rec in (lost, waiting):
        records.create(rec)
    present.add(waiting.id)
    assert w1.requeue.sweep() == []  # too recent
    time.sleep(PERIOD + 0.05)
    # A message missing from one sweep only is in flight (a worker taking it): not lost.
    present.add(lost.id)
    assert w1.requeue.sweep() == [] and w1.requeue.sweep() == []
    present.discard(lost.id)
    assert w1.requeue.sweep() == []  # missed once: confirmed by the next sweep
    assert w1.requeue.sweep() == [lost.id] and w2.requeue.sweep() == []
    assert sent == [("realign.validate", lost.id)]
    for n in (2, 3):
        time.sleep(PERIOD + 0.05)
        assert _confirmed(w2) == [lost.id] and len(sent) == n
    time.sleep(PERIOD + 0.05)
    assert _confirmed(w1) == [lost.id] and len(sent) == 3  # the cap: failed, not sent
    failed = records.get(lost.id)
    assert failed is not None and failed.status == JobStatus.failed
    assert failed.error is not None and failed.error.code == MESSAGE_LOST
    assert records.get(waiting.id).status == JobStatus.queued  # type: ignore[union-attr]


def test_the_probe_sees_messages_delivered_but_not_acknowledged(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A message a consumer holds (acks_late: running, or waiting out a countdown) is
    in kombu's unacked hash, not in the queue: the job is not re-sent for that."""
    from app.jobs.broker import make_celery

    settings = Settings(redis_url=redis_server.url, models_cache_dir=tmp_path / "store")
    app = make_celery(settings)
    app.send_task("realign.merge", args=["mrg_held"], queue="gpu")
    app.send_task("realign.validate", args=["mrg_waiting"], queue="cpu")
    app.send_task("realign.assemble", args=["mrg_split"], queue="cpu")  # a split's final task
    app.send_task("celery.backend_cleanup", args=[], queue="cpu")  # not one of ours
    broker = redis.Redis.from_url(redis_server.url, decode_responses=True)
    with app.connection_for_read() as conn:
        held = conn.SimpleQueue("gpu", no_ack=False).get(timeout=5)
        assert broker.llen("gpu") == 0 and broker.hlen("unacked") == 1
        assert jobs_in_broker(broker) == {"mrg_held", "mrg_waiting", "mrg_split"}
        held.ack()
    assert jobs_in_broker(broker) == {"mrg_waiting", "mrg_split"}


# -- a backlog longer than a page, on real Redis ------------------------------------------
BACKLOG = 1200  # queued jobs with a message, oldest first: more than a default page (500)
TIES = 40  # jobs created at one instant (one score in the index), at the end of the queue


def _backlog(records: JobRecords, lost_every: int) -> tuple[set[str], set[str]]:
    """BACKLOG + TIES queued jobs an hour old, oldest first; every ``lost_every``-th of
    the last 200 (behind the first page) and of the ties has lost its message.

    Returns:
        The ids with a message in the broker, and those without one.
    """
    start = datetime.now(UTC) - timedelta(hours=1)
    stamps = [start + timedelta(milliseconds=i) for i in range(BACKLOG)]
    stamps += [start + timedelta(milliseconds=BACKLOG)] * TIES
    present, lost = set(), set()
    for i, at in enumerate(stamps):
        rec = JobRecord(
            id=f"mrg_{i:05d}", owner="alice", spec=MergeSpec(residual="ab"),
            created_at=at, updated_at=at,
        )  # fmt: skip
        records.create(rec)
        behind = i >= BACKLOG - 200
        (lost if behind and i % lost_every == 0 else present).add(rec.id)
    return present, lost


@pytest.mark.parametrize(
    ("backend", "page"),
    [("redis", None), ("redis", 7), ("sqlite", 7)],
    ids=["redis-default-page", "redis-page-of-7", "sqlite-page-of-7"],
)
def test_a_long_queue_hides_no_lost_message(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str, page: int | None
) -> None:
    """1240 jobs queued, their messages in the broker but for a few at the end (behind
    more than a page of waiting jobs, and among jobs created at the same instant): one
    sweep re-sends exactly those, reading the queue a page at a time."""
    from app.jobs.kv import RedisKV

    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        records = JobRecords(RedisKV(server.url))
    else:
        records = JobRecords(SqliteKV(tmp_path / "jobs.sqlite"))
    present, lost = _backlog(records, lost_every=9)
    assert len(present) > 500 and lost
    settings = Settings(models_cache_dir=tmp_path / "store", job_requeue_after_s=PERIOD)
    sent: list[tuple[str, str]] = []
    runner = JobRunner(
        records, settings, "w1", lambda t, j: sent.append((t, j)), None, lambda: present
    )
    sweep = runner.requeue.sweep if page is None else partial(runner.requeue.sweep, page=page)
    assert sweep() == []  # every lost one missed once; the next sweep confirms
    done = sweep()
    assert sorted(done) == sorted(lost)
    assert sorted(sent) == sorted(("realign.validate", job_id) for job_id in lost)
    assert runner.requeue.sweep() == []  # once per period


def _confirmed(w: JobRunner) -> list[str]:
    """What a worker re-sends within two sweeps (the first may only note the miss)."""
    return w.requeue.sweep() or w.requeue.sweep()


@pytest.mark.slow
def test_a_split_merge_whose_final_message_is_lost_is_sent_again(
    redis_server: RedisServer, llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    """Every shard of a split merge is written, then the broker loses the final task's
    message: housekeeping sends it again (a job event says so) and the job succeeds,
    instead of staying 'running' with its staged shards forever."""
    from app.merge import compute

    compute(str(llama_triple.base), str(llama_triple.instruct), store=store_dir)
    roots = [llama_triple.base.parent]
    env = service_env(
        redis_server.url, store_dir, roots, REALIGN_JOB_REQUEUE_AFTER_S=str(AFTER_S),
        REALIGN_MAX_SHARD_GB="0.0005", REALIGN_MERGE_PARALLEL_MIN_SHARDS="2",
    )  # fmt: skip
    settings = Settings(
        redis_url=redis_server.url, models_cache_dir=store_dir, allowed_roots=roots,
        job_time_limit_s=8, visibility_timeout_s=10,
    )  # fmt: skip
    svc, workers = JobService.from_settings(settings), Workers(env, tmp_path)
    broker = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        rec, _ = svc.submit(_spec(llama_triple), ALICE)
        light = workers.start("light", queues="cpu")

        def validated() -> bool:
            job = svc.get(rec.id, ALICE)
            # acknowledged too: a validate message killed unacknowledged would come back
            # to "cpu" after the visibility timeout and pass for the final task's message
            done = job.status == JobStatus.queued and job.stage == JobStage.preflight
            return done and broker.hlen(UNACKED) == 0

        def final_waits() -> bool:
            waiting = broker.lrange("cpu", 0, -1)
            return [json.loads(m)["headers"]["task"] for m in waiting] == [TASK_ASSEMBLE]

        _until("the validation", validated, workers)
        workers.kill(light)  # final tasks go to "cpu": none is taken now
        workers.start("heavy", queues="gpu")  # the merge splits, its shards are written
        _until("the final task's message", final_waits, workers)
        assert svc.get(rec.id, ALICE).status == JobStatus.running
        broker.delete(*queue_keys("cpu"))  # the broker loses it
        _until("the final task re-sent", lambda: len(_resent(svc, rec.id)) == 1, workers)
        assert "final task" in _resent(svc, rec.id)[0]
        workers.start("light2", queues="cpu")
        _until("the job's end", lambda: svc.get(rec.id, ALICE).status.terminal, workers)
        job = svc.get(rec.id, ALICE)
        assert job.status == JobStatus.succeeded, (job.error, workers.logs())
    finally:
        workers.stop_all()
