"""The cross-machine build lock on a real Redis: lease, fencing, compare-and-delete."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.jobs.locks import RedisBuildLock
from app.store.locks import LockLostError, hold
from tests.jobs.conftest import RedisServer


@pytest.fixture
def lock(tmp_path: Path) -> Iterator[RedisBuildLock]:
    server = RedisServer(tmp_path / "redis")
    server.workdir.mkdir()
    server.start()
    yield RedisBuildLock(server.url)
    server.stop()


def test_one_holder_and_fencing_tokens_grow(lock: RedisBuildLock) -> None:
    first = lock.acquire("k", 0.3)
    assert first is not None
    assert lock.acquire("k", 0.3) is None  # held
    assert lock.renew("k", first, 0.3)
    lock.release("k", first + 1000)  # not the holder's token: nothing happens
    assert lock.acquire("k", 0.3) is None
    time.sleep(0.5)  # the holder died: its lease runs out
    second = lock.acquire("k", 5)
    assert second is not None and second > first
    assert not lock.renew("k", first, 5)  # the old holder cannot take it back
    lock.release("k", second)
    assert lock.acquire("k", 5) is not None


def test_hold_renews_and_reports_a_lost_lease(lock: RedisBuildLock) -> None:
    with hold(lock, "slow", 0.3) as held:
        time.sleep(0.8)  # longer than the lease: renewals keep it
        held.check("slow")
        assert lock.acquire("slow", 0.3) is None
        lock.client.delete(lock.prefix + "slow")  # taken away (e.g. Redis lost it)
        time.sleep(0.3)
        with pytest.raises(LockLostError):
            held.check("slow")
    assert lock.acquire("slow", 1) is not None
