"""The exact pack writer's failure paths (an abort or a write fault with frames in flight
ends promptly, with the cause, and leaves no thread waiting), and reading back packs of
many frames, decoded several at once."""

from __future__ import annotations

import itertools
import json
import resource
import signal
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pytest

from app.core.errors import ArtifactCorruptError, RealignError
from app.residuals.dtypes import BF16
from app.residuals.framed import _BATCH, _CACHED_FRAMES, FRAMES_INDEX, NEG, FramedPack
from app.residuals.frames import FRAME_ELEMS, Coding, FrameBuffers, lay_out
from app.residuals.framewriter import FramedWriter, _code_later, submit_first
from app.residuals.integrity import XXH3, ReadVerifier, xxh3_hex
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
        planes: Future[tuple[Coding, ...]] = Future()
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


def _pack(tmp_path: Path, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, Path]:
    """A written pack of one bf16 tensor spanning many frames, with corrections."""
    rng = np.random.default_rng(7)
    p = rng.integers(0, 1 << 16, rows * cols, dtype=np.uint32).astype(np.uint16)
    p = ((p & 0x00FF) | (rng.integers(0x38, 0x3C, p.size) << 8)).astype(np.uint16)
    neg = np.where(rng.random(p.size) < 0.03, p ^ 0x0101, 0).astype(np.uint16)
    writer = FramedWriter(tmp_path, [TensorSpec("w", BF16, (rows, cols))])
    step = 3 * cols + 5  # chunks that do not line up with frames
    for at in range(0, p.size, step):
        end = min(p.size, at + step)
        writer.write_pair("w", memoryview(p[at:end].tobytes()), memoryview(neg[at:end].tobytes()))
    writer.close()
    return p, neg, tmp_path


def _verifier(pack_dir: Path) -> ReadVerifier:
    files = sorted(pack_dir.glob("*.frames"))
    return ReadVerifier(
        {f: (f.stat().st_size, XXH3 + xxh3_hex(f.read_bytes())) for f in files}, "pack"
    )


def _buffers_once(pack: FramedPack) -> None:
    """Every decode buffer is either free or in one cache entry, never in two places."""
    held = [b for entry in pack._cache.values() for b in entry if b is not None]
    ids = [id(b) for b in pack._free + held]
    assert len(ids) == len(set(ids)) <= 2 * (_CACHED_FRAMES + _BATCH)


def test_frames_decoded_side_by_side_read_back_exactly(tmp_path: Path) -> None:
    """A tensor of 13 frames (more than the cache keeps) read back in row ranges that
    start and end inside frames and span several batches of frames decoded at once: every
    byte of p and neg, and the bytes read check against the files' checksums."""
    rows, cols = 52, FRAME_ELEMS // 4
    p, neg, pack_dir = _pack(tmp_path, rows, cols)
    verifier = _verifier(pack_dir)
    pack = FramedPack.open_framed(pack_dir, {}, "pack", verifier)
    try:
        info, info_neg = pack.tensors["w"], pack.tensors["w" + NEG]
        # p then neg (as a merge reads them), neg first, the same half twice
        orders = [((p, info), (neg, info_neg)), ((neg, info_neg), (p, info), (p, info))]
        for (row0, row1), order in itertools.product(
            ((0, rows), (1, 38), (37, 52), (5, 6), (0, 1)), orders
        ):
            out = bytearray((row1 - row0) * cols * 2)
            for want, which in order:
                pack.read_into(which, row0, row1, memoryview(out))
                assert bytes(out) == want[row0 * cols : row1 * cols].tobytes(), (row0, row1)
            _buffers_once(pack)
        verifier.finish()  # raises on a mismatch
    finally:
        pack.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("realign-decode")]


def _damage(pack_dir: Path, frame: int) -> None:
    index = json.loads((pack_dir / FRAMES_INDEX).read_text())["tensors"]["w"]
    file = pack_dir / index["file"]
    data = bytearray(file.read_bytes())
    at = index["frames"][frame]
    data[at : at + 4] = b"\xff\xff\xff\xff"  # its count of corrections
    file.write_bytes(bytes(data))


def test_a_damaged_frame_among_those_decoded_at_once_names_itself(tmp_path: Path) -> None:
    """A damaged frame in the middle of a batch fails the read with its name; the other
    frames and every buffer survive (a later read of the frames before it is right), and
    with a read verifier the file is named as not matching its checksum."""
    rows, cols = 40, FRAME_ELEMS // 4
    p, _, pack_dir = _pack(tmp_path, rows, cols)
    verifier = _verifier(pack_dir)
    _damage(pack_dir, 6)
    pack = FramedPack.open_framed(pack_dir, {}, "pack", None)
    try:
        with pytest.raises(ArtifactCorruptError, match=r"frame 6 of 'w'.*corrections"):
            pack.read_into(pack.tensors["w"], 0, rows, memoryview(bytearray(rows * cols * 2)))
        _buffers_once(pack)
        out = bytearray(24 * cols * 2)  # frames 0-5
        pack.read_into(pack.tensors["w"], 0, 24, memoryview(out))
        assert bytes(out) == p[: 24 * cols].tobytes()
    finally:
        pack.close()
    checked = FramedPack.open_framed(pack_dir, {}, "pack", verifier)
    with checked, pytest.raises(ArtifactCorruptError, match="does not match its recorded"):
        checked.read_into(checked.tensors["w"], 0, rows, memoryview(bytearray(rows * cols * 2)))


def test_an_interrupted_batch_returns_only_when_its_frames_are_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception that interrupts the wait for a batch (a task time limit raises in the
    reading thread) propagates only once no decode of that batch runs any more: nothing
    writes into the caller's buffer or the pack's buffers after it."""
    from app.residuals import framed

    rows, cols = 32, FRAME_ELEMS // 4
    _, _, pack_dir = _pack(tmp_path, rows, cols)
    waits: list[list[Future[None]]] = []

    def interrupted(futures: list[Future[None]]) -> object:
        waits.append(futures)
        if len(waits) == 1:
            raise TimeoutError("interrupted")  # as SoftTimeLimitExceeded would
        return wait(futures)

    monkeypatch.setattr(framed, "wait", interrupted)
    out = bytearray(rows * cols * 2)
    pack = FramedPack.open_framed(pack_dir, {}, "pack", None)
    with pack:
        with pytest.raises(TimeoutError):
            pack.read_into(pack.tensors["w"], 0, rows, memoryview(out))
        assert len(waits[0]) > 1 and all(f.done() for f in waits[0])
        _buffers_once(pack)
        assert not pack._cache  # nothing half-decoded is kept
