"""Build locks that hold across machines: a lease, a fencing token, renewal.

The store defines the protocol; a backend lives outside the pure core (Redis:
``app.jobs.locks.RedisBuildLock``) and is injected by the store factory. Without
one, an object store falls back to the node-local ``flock`` of its cache, which
deduplicates builds on one machine only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class BuildLock(Protocol):
    """A named mutual-exclusion lease shared by every builder of a store."""

    def acquire(self, name: str, lease_s: float) -> int | None:
        """Take ``name`` for ``lease_s`` seconds if free.

        Returns:
            A fencing token (grows with every acquisition of any lock), or None when
            another holder has it.
        """
        ...

    def renew(self, name: str, token: int, lease_s: float) -> bool:
        """Extend the lease held with ``token``; False when it was lost."""
        ...

    def release(self, name: str, token: int) -> None:
        """Free ``name`` if still held with ``token`` (never someone else's)."""
        ...


class LockLostError(RuntimeError):
    """The lease ran out (or was taken over) before the holder was done."""


class Held:
    """A held lock: its fencing token, and whether it is still ours."""

    def __init__(self, token: int) -> None:
        self.token = token
        self.lost = threading.Event()

    def check(self, name: str) -> None:
        """Raise when the lease was lost: a commit now could race a newer holder."""
        if self.lost.is_set():
            raise LockLostError(f"build lock {name} was lost (lease ran out); not publishing")


@contextlib.contextmanager
def hold(lock: BuildLock, name: str, lease_s: float, poll_s: float = 0.2) -> Iterator[Held]:
    """Wait for ``name``, keep its lease renewed while the block runs, release it.

    A holder that dies stops renewing; its lease runs out after ``lease_s`` and the
    next builder takes over with a larger fencing token.
    """
    while (token := lock.acquire(name, lease_s)) is None:
        time.sleep(poll_s)
    held = Held(token)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_s / 3):
            try:
                ok = lock.renew(name, token, lease_s)
            except Exception as exc:  # the lock service restarting: try next beat
                log.warning("build lock %s: renewal failed (%s)", name, exc)
                continue
            if not ok:
                held.lost.set()
                return

    keeper = threading.Thread(target=renew, name="realign-build-lock", daemon=True)
    keeper.start()
    try:
        yield held
    finally:
        stop.set()
        keeper.join()
        with contextlib.suppress(Exception):  # it expires on its own
            lock.release(name, token)
