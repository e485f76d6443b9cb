"""Job records done right, on both backends (a private Redis and the embedded SQLite):
atomic event numbers, compare-and-set leases, listing and counts from indexes,
retention, and the true delivery count."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from app.core.settings import Settings
from app.jobs.kv import KeyValue, RedisKV
from app.jobs.models import JobError, JobRecord, JobStatus, MergeSpec, utcnow
from app.jobs.records import JobRecords
from app.jobs.runner import JobRunner
from app.jobs.sqlite_kv import SqliteKV
from tests.jobs.conftest import RedisServer

SPEC = MergeSpec(base="/m/base", instruct="/m/instruct", target="/m/new")


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


def _hammer(n_threads: int, fn: object) -> None:
    start = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        start.wait()
        try:
            fn(i)  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _job(records: JobRecords, job_id: str, owner: str = "alice", **kw: object) -> JobRecord:
    rec = JobRecord(id=job_id, owner=owner, spec=SPEC, **kw)  # type: ignore[arg-type]
    records.create(rec)
    return rec


def test_concurrent_events_never_share_a_seq(records: JobRecords) -> None:
    """A cancel and progress events written at once (threads, separate connections on
    SQLite as in two processes) get distinct, gap-free numbers that match their order,
    so an SSE client resuming after seq n misses nothing and sees nothing twice."""
    rec = _job(records, "mrg_race")
    per_thread = 40

    def write(i: int) -> None:
        kv: KeyValue = records.kv
        if isinstance(kv, SqliteKV) and i % 2:  # another "process" on the same file
            kv = SqliteKV(kv.path)
        mine = JobRecords(kv)
        for _ in range(per_thread):
            kind = "log" if i == 0 else "progress"
            mine.add_event(rec, kind, "cancel requested" if kind == "log" else "")

    _hammer(8, write)
    events = records.events(rec.id)
    assert [e.seq for e in events] == list(range(1, 8 * per_thread + 1))
    assert sum(e.kind == "log" for e in events) == per_thread
    resumed = records.events(rec.id, after=123)
    assert [e.seq for e in resumed] == list(range(124, 8 * per_thread + 1))


def test_lease_is_compare_and_set(records: JobRecords) -> None:
    winners: list[str] = []
    lock = threading.Lock()

    def grab(i: int) -> None:
        if records.acquire_lease("mrg_l", f"w{i}", 30.0):
            with lock:
                winners.append(f"w{i}")

    _hammer(8, grab)
    assert len(winners) == 1
    owner = winners[0]
    assert records.acquire_lease("mrg_l", owner, 2.0)  # renewal by the holder
    assert not records.acquire_lease("mrg_l", "intruder", 5.0)
    records.release_lease("mrg_l", "intruder")  # not the holder: no effect
    assert records.lease_holder("mrg_l") == owner
    time.sleep(2.3)  # the renewed lease (2 s) expired: the next holder gets it
    assert records.acquire_lease("mrg_l", "next", 5.0)
    assert not records.acquire_lease("mrg_l", owner, 5.0)  # the old holder cannot renew
    records.release_lease("mrg_l", owner)
    assert records.lease_holder("mrg_l") == "next"


def test_listing_and_counts_come_from_indexes(records: JobRecords) -> None:
    """Pages and counts never read records outside the page: a garbled record of
    another job does not disturb them."""
    t0 = utcnow() - timedelta(hours=1)
    for i in range(12):
        owner = "alice" if i % 3 else "bob"
        rec = _job(records, f"mrg_{i:02d}", owner, created_at=t0 + timedelta(seconds=i))
        if i % 4 == 0:
            records.save(rec.model_copy(update={"status": JobStatus.running}))
        if i % 4 == 1:
            records.save(rec.model_copy(update={"status": JobStatus.succeeded}))
    records.kv.set("realign:job:mrg_00", "{not json")  # bob's oldest, running

    page, total = records.page("alice", None, 0, 3)
    assert total == 8 and [r.id for r in page] == ["mrg_11", "mrg_10", "mrg_08"]
    page, total = records.page("alice", JobStatus.queued, 1, 2)
    assert total == 4 and [r.id for r in page] == ["mrg_10", "mrg_07"]
    page, total = records.page(None, JobStatus.succeeded, 0, 50)
    assert total == 3 and [r.id for r in page] == ["mrg_09", "mrg_05", "mrg_01"]
    counts = records.count_by_status()
    assert counts == {
        "queued": 6,
        "validating": 0,
        "running": 3,
        "succeeded": 3,
        "failed": 0,
        "cancelled": 0,
    }
    assert sorted(records.running()) == ["mrg_00", "mrg_04", "mrg_08"]


def test_finished_jobs_expire_after_retention(records: JobRecords, tmp_path: Path) -> None:
    settings = Settings(models_cache_dir=tmp_path / "store", job_retention_days=7)
    runner = JobRunner(records, settings, "w", lambda task, job: None)
    old, recent, live = (_job(records, f"mrg_{n}") for n in ("old", "recent", "live"))
    long_ago = utcnow() - timedelta(days=8)
    for rec, when in ((old, long_ago), (recent, utcnow() - timedelta(days=6))):
        error = JobError(code="internal_error", message="x")
        records.add_event(rec, "status", "failed")
        records.request_cancel(rec.id)
        records.count_delivery(rec.id)
        records.save(rec.model_copy(update={"status": JobStatus.failed, "error": error,
                                            "finished_at": when}))  # fmt: skip
    records.save(live.model_copy(update={"status": JobStatus.running}))

    runner.housekeeping()

    assert records.get(old.id) is None and records.events(old.id) == []
    assert not records.cancel_requested(old.id) and records.deliveries(old.id) == 0
    assert records.get(recent.id) is not None and records.get(live.id) is not None
    ids = [r.id for r in records.page(None, None, 0, 50)[0]]
    assert ids == ["mrg_live", "mrg_recent"]
    assert records.page("alice", JobStatus.failed, 0, 50)[1] == 1
    assert records.count_by_status()["failed"] == 1


def test_record_shows_the_true_delivery_count(records: JobRecords) -> None:
    rec = _job(records, "mrg_d")
    for n in (1, 2, 3):
        records.count_delivery(rec.id)
        got = records.get(rec.id)
        assert got is not None and got.deliveries == n


def test_replica_reports_on_one_notice_are_all_kept(records: JobRecords) -> None:
    """Several serving replicas report on one load notice at once: no report is lost and
    each replica's latest one counts."""
    board = records.board
    board.announce("mrg_serve", "m")

    def report(i: int) -> None:
        for state in ("loading", "ready"):
            assert board.report("mrg_serve", f"replica-{i}", state)

    _hammer(6, report)
    latest = board.reports("mrg_serve")
    assert sorted(latest) == [f"replica-{i}" for i in range(6)]
    assert {r.state for r in latest.values()} == {"ready"}
    assert [n.job_id for n in board.pending()] == ["mrg_serve"]
    board.withdraw("mrg_serve")
    assert board.pending() == [] and board.reports("mrg_serve") == {}
    assert not board.report("mrg_serve", "late", "ready")  # after the job ended: dropped
    assert board.reports("mrg_serve") == {}
