"""Builders' staging directories, each under a lease.

A builder works in ``.staging/<key>.<token>`` (a name no other builder can pick)
next to ``<key>.<token>.lease``: its host, pid, token and when the lease runs out.
A thread renews the lease while the build runs. Anyone may remove a staging
directory whose lease has run out (its builder died: SIGKILL, OOM, power loss);
nobody touches one whose lease is current, or whose builder is a live process of the
same host (paused, say). A builder checks that its directory is still the one it made
before publishing it (:meth:`StagingArea.check`). No file lock is involved, so this holds
on NFS and on volumes where ``flock`` does nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from app.core.errors import StagingLostError

LEASE_SUFFIX = ".lease"
DEFAULT_LEASE_S = 120.0


@dataclass(frozen=True)
class Lease:
    """Who builds in a staging directory, and until when that claim holds."""

    host: str
    pid: int
    token: str
    expires_at: float
    process: str | None = None  # the builder process's identity (see _process_identity)


@dataclass(frozen=True)
class _Claim:
    """What :meth:`StagingArea.claim` made: its lease's token, the directory's identity,
    and whether the renewal found the lease swept."""

    token: str
    dev: int
    ino: int
    lost: threading.Event

    def holds(self, tmp: Path, lease_token: str | None) -> bool:
        try:
            now = tmp.stat()
        except OSError:
            return False
        same_dir = (now.st_dev, now.st_ino) == (self.dev, self.ino)
        return same_dir and not self.lost.is_set() and lease_token in (self.token, "")


class StagingArea:
    """The ``.staging`` directory of a store.

    Args:
        root: the staging directory.
        lease_s: how long a claim holds without renewal; renewed every third of it.
    """

    def __init__(self, root: Path, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.root = root
        self.lease_s = lease_s
        root.mkdir(parents=True, exist_ok=True)
        self._claims: dict[Path, _Claim] = {}

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[Path]:
        """A new, empty staging directory for ``key``, leased while the block runs; it
        and its lease are removed on exit (the caller publishes it by renaming it
        away first)."""
        token = uuid.uuid4().hex
        tmp = self.root / f"{key}.{token}"
        lease = self.lease_path(tmp)
        self._write_lease(lease, token)  # the lease first: never a staging dir without one
        stop = threading.Event()
        lost = threading.Event()
        renew = threading.Thread(
            target=self._renew, args=(lease, token, stop, lost), name="realign-lease",
            daemon=True,
        )  # fmt: skip
        try:
            tmp.mkdir()
            made = tmp.stat()
            self._claims[tmp] = _Claim(token, made.st_dev, made.st_ino, lost)
            renew.start()
            yield tmp
        finally:
            stop.set()
            if renew.is_alive():
                renew.join()
            self._claims.pop(tmp, None)
            shutil.rmtree(tmp, ignore_errors=True)
            lease.unlink(missing_ok=True)

    def check(self, tmp: Path) -> None:
        """Make sure ``tmp`` is still the directory :meth:`claim` made, before it is
        published: a builder paused past its lease may find it swept (its files gone
        with it, or a new directory of that name holding only what it wrote since).

        Raises:
            StagingLostError: it is not.
        """
        claim = self._claims.get(tmp)
        if claim is None or not claim.holds(tmp, self._lease_token(self.lease_path(tmp))):
            raise StagingLostError(
                f"the staging directory {tmp} was removed while this build ran (its lease "
                f"of {self.lease_s:g} s ran out: the process was paused?); nothing was "
                "published — run it again"
            )

    @staticmethod
    def lease_path(tmp: Path) -> Path:
        return tmp.with_name(tmp.name + LEASE_SUFFIX)

    def read_lease(self, tmp: Path) -> Lease | None:
        """The lease of a staging directory; None when it has none or it is unreadable."""
        try:
            return Lease(**json.loads(self.lease_path(tmp).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def sweep(self, now: float | None = None) -> list[Path]:
        """Remove staging directories whose lease ran out (and leases without a
        directory); current ones stay. A directory without a readable lease counts
        from its last change.

        Returns:
            The directories removed.
        """
        now = time.time() if now is None else now
        removed = []
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir():  # a lease, or a lease being written
                owner = entry.name.split(LEASE_SUFFIX)[0]
                if not (self.root / owner).exists():
                    with contextlib.suppress(OSError):
                        if entry.stat().st_mtime + self.lease_s < now:
                            entry.unlink()
                continue
            if self._expired(entry, now):
                shutil.rmtree(entry, ignore_errors=True)
                self.lease_path(entry).unlink(missing_ok=True)
                removed.append(entry)
        return removed

    def _expired(self, tmp: Path, now: float) -> bool:
        lease = self.read_lease(tmp)
        if lease is not None:
            return lease.expires_at < now and not _alive_here(lease)
        try:
            return tmp.lstat().st_mtime + self.lease_s < now
        except OSError:
            return False

    def _write_lease(self, lease: Path, token: str) -> None:
        info = Lease(
            socket.gethostname(), os.getpid(), token, time.time() + self.lease_s,
            _process_identity(os.getpid()),
        )  # fmt: skip
        part = lease.with_name(f"{lease.name}.{token[:8]}.part")
        part.write_text(json.dumps(asdict(info)))
        os.replace(part, lease)  # readers see the old lease or the new one, never half

    @staticmethod
    def _lease_token(lease: Path) -> str | None:
        """The token of a lease file; None when it is gone (swept), "" when unreadable."""
        try:
            return str(json.loads(lease.read_text())["token"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def _renew(self, lease: Path, token: str, stop: threading.Event, lost: threading.Event) -> None:
        while not stop.wait(self.lease_s / 3):
            if self._lease_token(lease) is None:  # swept while this process was paused
                lost.set()
                return
            with contextlib.suppress(OSError):
                self._write_lease(lease, token)


def _process_identity(pid: int) -> str | None:
    """What tells process ``pid`` from a later one given the same pid (a container
    restarted under the same hostname, the host rebooted): the boot's id and the
    process's start time (Linux); None where that cannot be read."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22: start time


def _alive_here(lease: Lease) -> bool:
    """Whether the builder of ``lease`` is a live process of this host (paused, or late
    renewing): its staging directory stays, whatever the lease says."""
    if lease.host != socket.gethostname():
        return False
    if lease.process is not None:
        return _process_identity(lease.pid) == lease.process
    try:
        os.kill(lease.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def copy_tree(src: Path, dest: Path) -> None:
    """Copy the files of ``src`` into the existing directory ``dest`` (hard links when
    on one filesystem: artifacts are never modified in place)."""
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
