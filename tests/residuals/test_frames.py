"""Exact packs' frames: nibble-coded sign/exponent planes and corrections by byte plane,
every byte back, the way a tensor's first frame chooses for its later ones, and damage
refused."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from app.residuals.frames import FRAME_ELEMS, FrameError, decode_frame, encode_frame
from app.residuals.nibbles import ESCAPES, encode, section_bytes

_RAW, _ZSTD, _NIBBLES = 0, 1, 2


def _residual_like(n: int, itemsize: int, values: int, escapes: float, seed: int) -> np.ndarray:
    """``n`` elements whose top byte takes ``values`` values, but for a share ``escapes``
    of them that take others; the other bytes random."""
    rng = np.random.default_rng(seed)
    dtype = {2: np.uint16, 4: np.uint32}[itemsize]
    low = rng.integers(0, 1 << (8 * itemsize - 8), n, dtype=np.uint64)
    top = rng.choice(np.arange(0x30, 0x30 + values), n, p=_skewed(values))
    odd = rng.random(n) < escapes
    top[odd] = rng.integers(0x80, 0x100, int(odd.sum()))
    return (low | top.astype(np.uint64) << (8 * itemsize - 8)).astype(dtype)


def _skewed(values: int) -> np.ndarray:
    w = 1.0 / np.arange(1, values + 1)
    return w / w.sum()


def _mode(frame: bytes, section: int) -> int:
    return frame[4 + 5 * section]


def _round_trip(p: np.ndarray, itemsize: int, plan: tuple[bool | bytes, ...] | None) -> bytes:
    neg = np.zeros_like(p)
    frame, _ = encode_frame(memoryview(p).cast("B"), memoryview(neg).cast("B"), itemsize, plan)
    po, no = bytearray(p.nbytes), bytearray(p.nbytes)
    decode_frame(memoryview(frame), p.size, itemsize, memoryview(po), memoryview(no))
    assert bytes(po) == p.tobytes() and not any(no)
    return frame


@pytest.mark.parametrize("itemsize", [2, 4])
def test_a_plane_of_few_values_is_nibble_coded_and_reads_back(itemsize: int) -> None:
    top = itemsize - 1
    sizes = (1, 2, 31, 32, 33, 63, 4097, FRAME_ELEMS - 1, FRAME_ELEMS)
    for n, values, escapes in itertools.product(sizes, (1, 9, 15), (0.0, ESCAPES / 2)):
        p = _residual_like(n, itemsize, values, escapes, n + values)
        frame = _round_trip(p, itemsize, None)
        # a plane of a few bytes is kept raw where the alphabet would make it bigger
        want = _NIBBLES if n >= 64 else _RAW if n <= 8 else _mode(frame, top)
        assert _mode(frame, top) == want, (n, values, escapes)
        if n >= 4097:  # half a byte per element, and a few escapes
            assert len(frame) < p.nbytes - n // 2 + n // 30


def test_a_plane_of_many_values_takes_zstd() -> None:
    p = _residual_like(FRAME_ELEMS, 2, 15, 3 * ESCAPES, 7)  # too many escape
    assert _mode(_round_trip(p, 2, None), 1) == _ZSTD
    p = _residual_like(FRAME_ELEMS, 2, 40, 0.0, 8)
    assert _mode(_round_trip(p, 2, None), 1) == _ZSTD


def test_later_frames_code_with_the_first_frames_alphabet() -> None:
    """Bytes outside the given alphabet escape; past 1/8 of the frame the plane falls back
    to zstd. Both read back."""
    p = _residual_like(4099, 2, 12, 0.0, 3)
    alphabet = bytes(range(0x30, 0x30 + 10))  # two of the twelve values escape
    frame = _round_trip(p, 2, (False, alphabet))
    assert _mode(frame, 1) == _NIBBLES and _mode(frame, 0) == _RAW  # the mantissa plane
    assert _mode(_round_trip(p, 2, (False, alphabet[:3])), 1) == _ZSTD  # most escape
    assert _mode(_round_trip(p, 2, (True, b"")), 1) == _ZSTD  # an empty alphabet: all escape


def test_the_nibble_code_refuses_an_alphabet_that_it_cannot_index() -> None:
    plane = memoryview(bytes(range(0x30, 0x34)) * 64)
    out = memoryview(bytearray(section_bytes(plane.nbytes)))
    assert encode(plane, b"\x30\x31\x32\x33", out) is not None
    assert encode(plane, b"\x30\x31\x31\x33", out) is None  # a value twice
    assert encode(plane, bytes(range(16)), out) is None  # 16 values leave no escape


@pytest.mark.parametrize("n", [4096, 4097])
def test_a_damaged_nibble_section_is_refused(n: int) -> None:
    p = _residual_like(n, 2, 9, 0.0, 11)
    frame = bytearray(_round_trip(p, 2, (False, bytes(range(0x30, 0x38)))))  # 0x38 escapes
    assert _mode(frame, 1) == _NIBBLES and _mode(frame, 0) == _RAW
    at = 4 + 5 * 2 + n  # the nibble section, after the raw mantissa plane
    k = frame[at]
    escaped = int.from_bytes(frame[at + 1 + k : at + 5 + k], "little")
    assert k == 8 and escaped > 0
    codes = at + 5 + k
    damages = {
        "alphabet of 16": (at, 16),
        "a code past the alphabet": (codes + 5, 0xEE if k < 14 else 0xE0),
        "an escape too few": (at + 1 + k, escaped + 1),
        "an escape too many": (at + 1 + k, escaped - 1),
    }
    if n % 2:
        damages["a pad nibble"] = (codes + n // 2, frame[codes + n // 2] | 0x10)
    for what, (where, value) in damages.items():
        bad = bytearray(frame)
        bad[where] = value
        po, no = bytearray(2 * n), bytearray(2 * n)
        with pytest.raises(FrameError):
            decode_frame(memoryview(bytes(bad)), n, 2, memoryview(po), memoryview(no))
            pytest.fail(f"{what}: decoded")


def test_a_zstd_section_claiming_a_huge_size_is_refused_not_allocated() -> None:
    """A damaged zstd frame header may claim any content size: the section is refused as
    damaged instead of the decoder trying to allocate it."""
    n = 4096
    p = np.arange(n, dtype=np.uint16) % 7  # a mantissa plane zstd shrinks
    frame = bytearray(_round_trip(p, 2, None))
    assert _mode(frame, 0) == _ZSTD
    frame[4 + 5 * 2 + 4] = 0xE0  # the zstd frame header of section 0: an 8-byte size
    po, no = bytearray(2 * n), bytearray(2 * n)
    with pytest.raises(FrameError, match="claims"):
        decode_frame(memoryview(bytes(frame)), n, 2, memoryview(po), memoryview(no))


@pytest.mark.parametrize("itemsize", [2, 4])
def test_corrections_by_byte_plane_read_back_and_damage_is_refused(itemsize: int) -> None:
    """Gaps of every width a frame holds (one to three bytes) and values come back from
    their byte planes; sections that mix layouts, and positions past the frame, are
    refused."""
    n = FRAME_ELEMS
    rng = np.random.default_rng(itemsize)
    dtype = {2: np.uint16, 4: np.uint32}[itemsize]
    p = rng.integers(0, 1 << (8 * itemsize), n, dtype=np.uint64).astype(dtype)
    gaps, values = itemsize, itemsize + 1
    po, no = bytearray(p.nbytes), bytearray(p.nbytes)
    dense = np.concatenate([[0, 1, 300], rng.choice(n, 5000, replace=False)])
    sparse = np.array([5, 70_000, 70_300, 200_000, 200_001, 900_000, n - 1])  # gaps >= 2**16
    for at in (dense, sparse):
        neg = np.zeros(n, dtype)
        neg[at] = rng.integers(1, 1 << (8 * itemsize), at.size, dtype=np.uint64).astype(dtype)
        frame, count = encode_frame(memoryview(p).cast("B"), memoryview(neg).cast("B"), itemsize)
        assert count == np.count_nonzero(neg)
        assert _mode(frame, gaps) & 0x80 and _mode(frame, values) & 0x80
        decode_frame(memoryview(frame), n, itemsize, memoryview(po), memoryview(no))
        assert bytes(po) == p.tobytes() and bytes(no) == neg.tobytes()
    for section, flip in ((gaps, 0x80), (0, 0x80)):
        bad = bytearray(frame)
        bad[4 + 5 * section] ^= flip
        with pytest.raises(FrameError, match="mix"):
            decode_frame(memoryview(bytes(bad)), n, itemsize, memoryview(po), memoryview(no))
    # two corrections in a small frame: their sections stay raw, by byte plane
    small = np.zeros(64, dtype)
    small[[3, 60]] = 1
    tiny, _ = encode_frame(memoryview(p[:64]).cast("B"), memoryview(small).cast("B"), itemsize)
    assert _mode(tiny, gaps) == 0x80 and _mode(tiny, values) == 0x80
    po, no = bytearray(64 * itemsize), bytearray(64 * itemsize)
    top = len(tiny) - 2 * itemsize - 1  # the second gap's byte 3; byte 2 two before it
    for where in (top, top - 2):  # the second position moves 2**24 or 2**16 on
        bad = bytearray(tiny)
        bad[where] = 0x01
        with pytest.raises(FrameError, match="past the end"):
            decode_frame(memoryview(bytes(bad)), 64, itemsize, memoryview(po), memoryview(no))
    bad = bytearray(tiny)
    bad[top - 1] = 0x01  # the first gap's byte 3: 2**24 on, past the end too
    with pytest.raises(FrameError, match="past the end"):
        decode_frame(memoryview(bytes(bad)), 64, itemsize, memoryview(po), memoryview(no))
