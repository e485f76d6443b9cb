"""Build locks that hold across machines: a lease, a fencing token, renewal.

The store defines the protocol; a backend lives outside the pure core (Redis:
``app.jobs.locks.RedisBuildLock``) and is handed to the store by its caller
(``store_from_settings(settings, lock=...)``). Without one, an object store falls
back to the node-local ``flock`` of its cache, which deduplicates builds on one
machine only; the bucket's conditional commit still lets only one build publish.

A lease is only as good as the holder's knowledge of it: a process paused (GC,
SIGSTOP, a stalled VM) past its lease may wake up believing it still holds the lock.
So a holder counts its lease from the last renewal the lock service *confirmed*
(measured on the monotonic clock, which runs on while the process is stopped), and
asks the service once more right before it commits (:meth:`Held.confirm`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from app.core.errors import BuildLockLostError

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


class Held:
    """A held lock: its fencing token, and whether it is still ours.

    Args:
        token: the fencing token of this acquisition (0: no shared lock).
        name: the lock's name (for messages).
        lock: the lock service, asked by :meth:`confirm`; None = nothing to ask.
        lease_s: the lease; it counts from the last confirmed renewal.
        since: when the request that took the lock was sent (monotonic; default now).
    """

    def __init__(
        self,
        token: int,
        name: str = "",
        lock: BuildLock | None = None,
        lease_s: float = float("inf"),
        since: float | None = None,
    ) -> None:
        self.token, self.name, self.lock, self.lease_s = token, name, lock, lease_s
        self.lost = threading.Event()
        # The lease started no earlier than the request that got it was sent.
        self._since = time.monotonic() if since is None else since

    def renewed(self, sent_at: float) -> None:
        """The service confirmed a renewal sent at ``sent_at`` (monotonic)."""
        self._since = max(self._since, sent_at)

    def expired(self) -> bool:
        """True once the lease may have run out in the lock service."""
        return time.monotonic() - self._since >= self.lease_s

    def check(self) -> None:
        """Raise when the lease is lost or may have run out (no request made).

        Raises:
            BuildLockLostError: a commit now could race a newer holder.
        """
        if self.lost.is_set() or self.expired():
            self.lost.set()
            raise BuildLockLostError(
                f"build lock {self.name} was lost before the commit (its {self.lease_s:g} s "
                "lease ran out: the builder was paused, or the lock service was "
                "unreachable); nothing was published — run the job again: it reuses the "
                "artifact if another builder published it (REALIGN_STORE_LEASE_S sets "
                "the lease)"
            )

    def confirm(self) -> None:
        """Renew the lease now, waiting for the answer, then :meth:`check`: the last
        step before a commit. An unreachable lock service does not end the lease
        early; only its running out does.

        Raises:
            BuildLockLostError: another holder took the lock, or the lease ran out.
        """
        self.check()
        if self.lock is None:
            return
        sent = time.monotonic()
        try:
            ok = self.lock.renew(self.name, self.token, self.lease_s)
        except Exception as exc:  # the lock service restarting: the lease decides
            log.warning("build lock %s: renewal failed (%s)", self.name, exc)
        else:
            if ok:
                self.renewed(sent)
            else:
                self.lost.set()
        self.check()


@contextlib.contextmanager
def hold(lock: BuildLock, name: str, lease_s: float, poll_s: float = 0.2) -> Iterator[Held]:
    """Wait for ``name``, keep its lease renewed while the block runs, release it.

    A holder that dies stops renewing; its lease runs out after ``lease_s`` and the
    next builder takes over with a larger fencing token. A holder whose renewals fail
    (refused, or unanswered until the lease ran out) is marked lost.
    """
    while True:
        sent = time.monotonic()
        if (token := lock.acquire(name, lease_s)) is not None:
            break
        time.sleep(poll_s)
    held = Held(token, name, lock, lease_s, since=sent)
    stop = threading.Event()
    keeper = threading.Thread(
        target=_keep, args=(held, stop), name="realign-build-lock", daemon=True
    )
    keeper.start()
    try:
        yield held
    finally:
        stop.set()
        keeper.join()
        with contextlib.suppress(Exception):  # it expires on its own
            lock.release(name, token)


def _keep(held: Held, stop: threading.Event) -> None:
    """Renew ``held`` every third of its lease until ``stop`` or until it is lost."""
    assert held.lock is not None
    while not stop.wait(held.lease_s / 3):
        sent = time.monotonic()
        try:
            ok = held.lock.renew(held.name, held.token, held.lease_s)
        except Exception as exc:  # the lock service restarting: try next beat
            log.warning("build lock %s: renewal failed (%s)", held.name, exc)
            ok = not held.expired()
        else:
            if ok:
                held.renewed(sent)
        if not ok:
            held.lost.set()
            log.warning("build lock %s: lease lost; this builder will not commit", held.name)
            return
