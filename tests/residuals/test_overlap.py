"""The device pipeline's schedule (app/residuals/overlap.py), checked on a simulated
device: lanes that run their work in order and keep time, events that carry the time
their lane reached. The order in which work is issued, which staging slot it uses and
what waits for what is the code the CUDA backend runs; only the clock is simulated."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import pytest

from app.residuals.overlap import DEPTH, Lanes, Overlap, Ticket

UPLOAD, COMPUTE, DOWNLOAD = 2.0, 1.0, 1.5  # time units per chunk: the upload is the bound


@dataclass(frozen=True)
class Mark:
    """An event: the time its lane had reached when it was recorded."""

    at: float

    def synchronize(self) -> None:
        pass


@dataclass(frozen=True)
class Span:
    what: str
    chunk: int
    slot: int
    start: float
    end: float


@dataclass
class Device:
    """Three simulated lanes and a log of the work they ran."""

    log: list[Span] = field(default_factory=list)
    current: SimLane | None = None
    synced: list[str] = field(default_factory=list)

    def run(self, what: str, chunk: int, slot: int, cost: float) -> None:
        assert self.current is not None, f"{what} {chunk} issued outside a lane"
        lane = self.current
        start = lane.clock
        lane.clock += cost
        assert what == lane.name, f"{what} of chunk {chunk} issued on the {lane.name} lane"
        self.log.append(Span(what, chunk, slot, start, lane.clock))

    def span(self, what: str, chunk: int) -> Span:
        return next(s for s in self.log if s.what == what and s.chunk == chunk)


@dataclass
class SimLane:
    name: str
    device: Device
    clock: float = 0.0

    def wait(self, event: Mark) -> None:
        self.clock = max(self.clock, event.at)

    def record(self) -> Mark:
        return Mark(self.clock)

    def active(self) -> AbstractContextManager[object]:
        return self._active()

    @contextmanager
    def _active(self) -> Iterator[None]:
        before, self.device.current = self.device.current, self
        try:
            yield
        finally:
            self.device.current = before

    def synchronize(self) -> None:
        self.device.synced.append(self.name)


def sim() -> tuple[Device, Overlap[Mark]]:
    dev = Device()
    lanes = Lanes(*(SimLane(n, dev) for n in ("upload", "compute", "download")))
    return dev, Overlap(lanes)


def chunk(dev: Device, k: int) -> tuple[Callable[[int], int], Callable[[int], Callable[[], None]]]:
    """The upload and compute functions of chunk ``k`` (what the CUDA backend passes)."""

    def upload(slot: int) -> int:
        dev.run("upload", k, slot, UPLOAD)
        return slot

    def compute(slot: int) -> Callable[[], None]:
        dev.run("compute", k, slot, COMPUTE)
        return lambda: dev.run("download", k, slot, DOWNLOAD)

    return upload, compute


def overlaps(a: Span, b: Span) -> bool:
    return a.start < b.end and b.start < a.end


def test_chunks_overlap_on_three_lanes_and_slots_are_reused_only_when_free() -> None:
    dev, sched = sim()
    n = 8
    tickets = [sched.submit(*chunk(dev, k)) for k in range(n)]
    sched.flush()
    for t in tickets:
        t.wait()
    for k in range(n):
        up, comp, down = (dev.span(w, k) for w in ("upload", "compute", "download"))
        assert up.slot == comp.slot == down.slot == k % DEPTH
        # each chunk's work in order: compute after its upload, download after its compute
        assert comp.start >= up.end and down.start >= comp.end
        # a slot is written again only after the chunk that used it was downloaded
        if k >= DEPTH:
            assert up.start >= dev.span("download", k - DEPTH).end
    for k in range(1, n - 1):
        # chunk k+1 goes up while chunk k computes and chunk k-1 comes down
        comp = dev.span("compute", k)
        assert overlaps(dev.span("upload", k + 1), comp)
        assert overlaps(dev.span("download", k - 1), comp)
    # the slowest lane never waits: the whole run is n uploads plus one compute and download
    end = max(s.end for s in dev.log)
    assert end == pytest.approx(n * UPLOAD + COMPUTE + DOWNLOAD)
    assert end < 0.6 * n * (UPLOAD + COMPUTE + DOWNLOAD)  # one lane after the other


def test_a_chunk_is_computed_once_the_next_is_uploaded_or_at_flush() -> None:
    dev, sched = sim()
    first = sched.submit(*chunk(dev, 0))
    # the math may block the host: chunk 0 is computed only after chunk 1's upload is queued
    assert [(s.what, s.chunk) for s in dev.log] == [("upload", 0)]
    sched.submit(*chunk(dev, 1))
    assert [(s.what, s.chunk) for s in dev.log] == [
        ("upload", 0), ("upload", 1), ("compute", 0), ("download", 0),
    ]  # fmt: skip
    first.wait()  # resolved: returns at once
    sched.flush()
    assert [(s.what, s.chunk) for s in dev.log][-2:] == [("compute", 1), ("download", 1)]
    sched.flush()  # nothing held: nothing issued
    assert len(dev.log) == 6


def test_an_error_reaches_the_ticket_and_the_lanes_are_drained() -> None:
    dev, sched = sim()
    up, _ = chunk(dev, 0)

    def broken(slot: int) -> Callable[[], None]:
        raise RuntimeError("CUDA out of memory on chunk 0")

    ticket = sched.submit(up, broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        sched.submit(*chunk(dev, 1))  # issues chunk 0's compute, which fails
    with pytest.raises(RuntimeError, match="out of memory"):
        ticket.wait()  # the thread that would write chunk 0 gets the error, not a hang
    sched.close()  # chunk 1 is issued, then every lane waited for
    assert dev.synced == ["upload", "compute", "download"]
    assert dev.span("download", 1).chunk == 1


def test_a_ticket_hands_completion_to_another_thread() -> None:
    import threading

    ticket: Ticket[Mark] = Ticket()
    got: list[str] = []
    waiter = threading.Thread(target=lambda: (ticket.wait(), got.append("written")))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # not issued yet: the writer waits
    ticket.resolve(Mark(1.0))
    waiter.join(5)
    assert got == ["written"]


def test_fewer_than_three_slots_are_refused() -> None:
    dev = Device()
    lanes = Lanes(*(SimLane(n, dev) for n in ("upload", "compute", "download")))
    with pytest.raises(ValueError, match="at least 3"):
        Overlap(lanes, depth=2)
