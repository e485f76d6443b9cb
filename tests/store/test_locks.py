"""The cross-machine build lock on a real Redis: lease, fencing, compare-and-delete,
a lease lost when renewals fail, and the callers that hand it to the store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.errors import BuildLockLostError
from app.jobs.locks import RedisBuildLock, cluster_store
from app.store.factory import store_from_settings
from app.store.local import LocalStore
from app.store.locks import hold
from app.store.objects import ObjectStore
from tests.jobs.conftest import RedisServer
from tests.s3server import S3_ENV, S3Server, object_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def lock(tmp_path: Path) -> Iterator[RedisBuildLock]:
    server = RedisServer(tmp_path / "redis")
    server.workdir.mkdir()
    server.start()
    yield RedisBuildLock(server.url)
    server.stop()


def test_one_holder_and_fencing_tokens_grow(lock: RedisBuildLock) -> None:
    first = lock.acquire("k", 30)
    assert first is not None
    assert lock.acquire("k", 30) is None  # held
    assert lock.renew("k", first, 30)
    lock.release("k", first + 1000)  # not the holder's token: nothing happens
    assert lock.acquire("k", 30) is None
    assert lock.renew("k", first, 0.2)  # its last renewal...
    time.sleep(0.5)  # ...then the holder died: its lease runs out in Redis
    second = lock.acquire("k", 5)
    assert second is not None and second > first
    assert not lock.renew("k", first, 5)  # the old holder cannot take it back
    lock.release("k", second)
    assert lock.acquire("k", 5) is not None


def test_hold_renews_and_reports_a_lost_lease(lock: RedisBuildLock) -> None:
    # A 1.5 s lease renewed every 0.5 s: a loaded CI machine may delay one renewal by
    # tenths of a second without the lease running out.
    with hold(lock, "slow", 1.5) as held:
        time.sleep(3.5)  # longer than the lease: renewals keep it
        held.check()
        assert lock.acquire("slow", 1.5) is None
        lock.client.delete(lock.prefix + "slow")  # taken away (e.g. Redis lost it)
        assert held.lost.wait(10)  # the next renewal finds out
        with pytest.raises(BuildLockLostError):
            held.check()
    assert lock.acquire("slow", 1) is not None


def test_confirm_asks_the_lock_service(lock: RedisBuildLock) -> None:
    """Right before a commit the holder asks Redis: a lock taken over since the last
    renewal is reported at once, without waiting for the renewal thread."""
    with hold(lock, "taken", 30) as held:
        held.confirm()
        lock.client.delete(lock.prefix + "taken")  # the lease ran out in Redis...
        assert lock.acquire("taken", 30) is not None  # ...and another builder took it
        with pytest.raises(BuildLockLostError, match="taken"):
            held.confirm()


def test_failed_renewals_mark_the_lease_lost(tmp_path: Path) -> None:
    """Redis goes away: renewals fail, and once the lease has run out unconfirmed the
    holder counts it lost (another builder may hold it after a Redis restart)."""
    server = RedisServer(tmp_path / "redis")
    server.workdir.mkdir()
    server.start()
    started = time.monotonic()
    with hold(RedisBuildLock(server.url), "gone", 3.0) as held:
        server.stop()
        time.sleep(0.2)
        held.check()  # unconfirmed for less than the lease: still ours
        assert held.lost.wait(10)
        assert time.monotonic() - started >= 3.0  # not before the lease ran out
        assert held.lost.is_set()
        with pytest.raises(BuildLockLostError, match="lease ran out"):
            held.confirm()


def test_cluster_callers_hand_the_lock_to_the_store(
    lock: RedisBuildLock, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """The pure factory adds no lock; the job runner, the job service and the CLI pass
    the Redis one when Redis and an object store are configured."""
    from app.jobs.records import JobRecords
    from app.jobs.runner import JobRunner
    from app.jobs.service import JobService
    from app.jobs.sqlite_kv import SqliteKV

    port = lock.client.connection_pool.connection_kwargs["port"]
    redis_url = f"redis://127.0.0.1:{port}/0"
    settings = object_settings(s3_server, bucket, tmp_path / "c", redis_url=redis_url)
    plain, shared = store_from_settings(settings), cluster_store(settings)
    assert isinstance(plain, ObjectStore) and plain.lock is None
    assert isinstance(shared, ObjectStore) and isinstance(shared.lock, RedisBuildLock)
    assert isinstance(cluster_store(settings, tmp_path / "local"), LocalStore)
    records = JobRecords(SqliteKV(tmp_path / "jobs.sqlite"))
    runner = JobRunner(records, settings, "w1", lambda task, job: None)
    service = JobService.from_settings(settings)
    for st in (runner.store, service.store):
        assert isinstance(st, ObjectStore) and isinstance(st.lock, RedisBuildLock)
    env = {
        **os.environ,
        **S3_ENV,
        "PYTHONPATH": str(ROOT),
        "REALIGN_REDIS_URL": redis_url,
        "REALIGN_STORE_URL": settings.store_url,
        "REALIGN_S3_ENDPOINT_URL": s3_server.endpoint,
        "REALIGN_MODELS_CACHE_DIR": str(tmp_path / "cli"),
    }
    code = (
        "from pathlib import Path\n"
        "from app.cli.common import builder_store\n"
        "print(type(builder_store(None).lock).__name__, builder_store(Path('x')))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert res.stdout.split() == ["RedisBuildLock", "x"], res.stderr
