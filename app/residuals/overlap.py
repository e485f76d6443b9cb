"""The order in which a device backend issues each chunk's copies and math, so that they
overlap: chunk k+1 is copied to the device while chunk k is computed and chunk k-1 is
copied back.

Three lanes (CUDA streams) run in parallel: ``upload`` (host -> device copies),
``compute`` and ``download`` (device -> host copies). Events order them per chunk:
compute waits for the chunk's upload, download for its compute. Nothing waits for the
whole device. A chunk's inputs go to one of ``depth`` device staging slots in turn; a
slot is written again only once the chunk that last used it has been downloaded (its
outputs may still alias its inputs), so with three slots the upload of chunk k+1 need
not wait for the download of chunk k-1.

The math itself may block the host (finding the few elements to recompute exactly needs
their count), so a chunk's compute is issued only after the *next* chunk's upload is
already queued: :meth:`Overlap.submit` uploads its chunk and then issues the compute and
download of the previous one; :meth:`Overlap.flush` issues the last. A :class:`Ticket`
tells the thread that reads a chunk's outputs when they are in host memory.

Pure Python: the lanes are anything with the :class:`Lane` methods (CUDA streams in
:mod:`app.residuals.torch_backends`, :class:`HostLane` on the CPU, a simulated timeline
in the tests).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Generic, Protocol, TypeVar

DEPTH = 3


class Event(Protocol):
    """A point in a lane's queue (``torch.cuda.Event``)."""

    def synchronize(self) -> None:
        """Block the calling thread until the lane's work before this point is done."""


E = TypeVar("E", bound=Event)
U = TypeVar("U")


class Lane(Protocol[E]):
    """An in-order queue of device work (a CUDA stream)."""

    def wait(self, event: E) -> None:
        """Make work queued from now on wait for ``event`` (without blocking the host)."""

    def record(self) -> E:
        """An event that completes once the work queued so far is done."""

    def active(self) -> AbstractContextManager[object]:
        """Queue the work issued inside the ``with`` block on this lane."""

    def synchronize(self) -> None:
        """Block until everything queued on this lane is done."""


@dataclass(frozen=True)
class Lanes(Generic[E]):
    """The three lanes of a device backend."""

    upload: Lane[E]
    compute: Lane[E]
    download: Lane[E]

    def synchronize(self) -> None:
        """Block until every lane is idle."""
        for lane in (self.upload, self.compute, self.download):
            lane.synchronize()


class _Complete:
    def synchronize(self) -> None:
        pass


class HostLane:
    """A lane on the CPU: work runs when it is issued, so every event is complete."""

    def wait(self, event: Event) -> None:
        pass

    def record(self) -> Event:
        return _Complete()

    def active(self) -> AbstractContextManager[object]:
        return nullcontext()

    def synchronize(self) -> None:
        pass


def host_lanes() -> Lanes[Event]:
    """Lanes for a backend whose device is the CPU."""
    return Lanes(HostLane(), HostLane(), HostLane())


class Ticket(Generic[E]):
    """When one chunk's outputs are in host memory (waited on by another thread)."""

    def __init__(self) -> None:
        self._issued = threading.Event()
        self._event: E | None = None
        self._error: BaseException | None = None

    def resolve(self, event: E) -> None:
        """The chunk's download is queued; ``event`` completes with it."""
        self._event = event
        self._issued.set()

    def fail(self, error: BaseException) -> None:
        """The chunk's work could not be issued: :meth:`wait` raises ``error``."""
        self._error = error
        self._issued.set()

    def wait(self) -> None:
        """Block until the chunk's outputs are in host memory.

        Raises:
            BaseException: the error that stopped the chunk's work from being issued.
        """
        self._issued.wait()
        if self._error is not None:
            raise self._error
        assert self._event is not None
        self._event.synchronize()


@dataclass
class _Held(Generic[E]):
    """A chunk uploaded (queued) whose compute and download are not issued yet."""

    slot: int
    uploaded: E
    compute: Callable[[], Callable[[], None]]
    ticket: Ticket[E]


class Overlap(Generic[E]):
    """Issues chunks' uploads, computes and downloads on three lanes, in overlap.

    Args:
        lanes: where each kind of work is queued.
        depth: device staging slots (at least 3: see the module docstring).
    """

    def __init__(self, lanes: Lanes[E], depth: int = DEPTH) -> None:
        if depth < DEPTH:
            raise ValueError(f"depth {depth}: at least {DEPTH} staging slots keep copies apart")
        self.lanes = lanes
        self.depth = depth
        self._downloaded: list[E | None] = [None] * depth
        self._count = 0
        self._held: _Held[E] | None = None

    def submit(
        self, upload: Callable[[int], U], compute: Callable[[U], Callable[[], None]]
    ) -> Ticket[E]:
        """Queue one chunk: ``upload(slot)`` now on the upload lane (it copies the chunk's
        inputs into staging slot ``slot`` and returns what compute needs); then the
        compute and download of the chunk submitted before this one.

        ``compute(staged)`` runs on the compute lane when this chunk's turn comes and
        returns the function that queues its downloads (run on the download lane).

        Returns:
            This chunk's ticket; it resolves at the next :meth:`submit` or :meth:`flush`.
        """
        slot = self._count % self.depth
        last_use = self._downloaded[slot]
        if last_use is not None:
            self.lanes.upload.wait(last_use)
        with self.lanes.upload.active():
            staged = upload(slot)
        held = _Held(slot, self.lanes.upload.record(), partial(compute, staged), Ticket[E]())
        self._count += 1
        previous, self._held = self._held, held
        if previous is not None:
            self._finish(previous)
        return held.ticket

    def flush(self) -> None:
        """Issue the compute and download of the last chunk submitted."""
        held, self._held = self._held, None
        if held is not None:
            self._finish(held)

    def _finish(self, held: _Held[E]) -> None:
        lanes = self.lanes
        try:
            lanes.compute.wait(held.uploaded)
            with lanes.compute.active():
                download = held.compute()
            lanes.download.wait(lanes.compute.record())
            with lanes.download.active():
                download()
            done = lanes.download.record()
        except BaseException as exc:
            held.ticket.fail(exc)
            raise
        self._downloaded[held.slot] = done
        held.ticket.resolve(done)

    def close(self) -> None:
        """Issue what is held, then wait until every lane is idle (before host buffers
        the copies use are freed); the lanes are waited for even when issuing fails."""
        try:
            self.flush()
        finally:
            self.lanes.synchronize()
