"""The exact pack writer's failure paths: an abort or a write fault with frames in flight
ends promptly, with the cause, and leaves no thread waiting."""

from __future__ import annotations

import resource
import signal
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from app.core.errors import RealignError
from app.residuals.dtypes import BF16
from app.residuals.frames import FRAME_ELEMS, FrameBuffers, lay_out
from app.residuals.framewriter import FramedWriter, _code_later, submit_first
from app.residuals.shards import TensorSpec


def _frame(seed: int) -> memoryview:
    rng = np.random.default_rng(seed)
    return memoryview(rng.integers(0, 1 << 16, FRAME_ELEMS, dtype=np.uint16).tobytes())


def test_a_first_frame_cancelled_before_it_ran_releases_the_later_frames() -> None:
    """An abort cancels queued frames in order; a pool thread may take a tensor's second
    frame between the first's cancel and its own: it must not wait for the first's answer
    for ever."""
    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(gate.wait)  # the only thread is busy: both frames stay queued
        planes: Future[tuple[bool, ...]] = Future()
        laid = [lay_out(_frame(k), None, 2, FrameBuffers()) for k in range(2)]
        first = submit_first(pool, laid[0], planes)
        later = pool.submit(_code_later, laid[1], planes)
        assert first.cancel()  # as the appender does after an error
        gate.set()  # the thread skips the first frame and takes the later one
        with pytest.raises(CancelledError):
            later.result(timeout=10)
        assert planes.cancelled()


def test_a_file_size_fault_with_frames_in_flight_ends_with_its_cause(tmp_path: Path) -> None:
    """A real write fault (RLIMIT_FSIZE: the kernel refuses to grow the file) while many
    frames are queued: the caller gets the error, with the OSError as its cause, and
    abort returns with no writer thread left."""
    frames = 24
    spec = TensorSpec("w", BF16, (frames, FRAME_ELEMS))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, hard))
    before = {t.name for t in threading.enumerate()}
    writer = FramedWriter(tmp_path, [spec])
    try:
        with pytest.raises((OSError, RealignError)) as caught:
            for k in range(frames):
                writer.write_pair("w", _frame(k), None)
            writer.close()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    err = caught.value
    assert isinstance(err, OSError) or isinstance(err.__cause__, OSError), repr(err)
    writer.abort()  # again: idempotent, returns
    left = {t.name for t in threading.enumerate() if t.is_alive()} - before
    assert not any(n.startswith(("realign-append", "realign-encode", "realign-io")) for n in left)
