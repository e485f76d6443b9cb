"""The frame codec of exact residual packs.

An exact pack stores each residual tensor as a pair ``(p, neg)`` of its input dtype W with
``p - neg == instruct - base`` exactly (see ``native.exact_split``): ``p`` is the residual
rounded once to W, ``neg`` the rounding error, zero for most elements. Both are cut into
frames of :data:`FRAME_ELEMS` elements, each encoded on its own:

* ``p`` as byte planes (byte ``j`` of every element together). A residual's sign and
  exponent byte takes few distinct values: its plane is nibble-coded (4 bits per byte,
  :mod:`app.residuals.nibbles`), else coded with zstd; mantissa planes are kept as they
  are where zstd does not win.
* ``neg`` sparsely: the positions of its non-zero elements (``u32`` gaps between them) and
  their values, each by byte plane and zstd (most gaps fit their low byte: zstd makes
  short work of the other three planes).

Frame layout (little endian): ``u32`` count of non-zero ``neg`` elements, then one section
header per payload (``u8`` mode: 0 raw, 1 zstd, 2 nibbles, plus :data:`_BY_PLANE` where the
payload holds its elements by byte plane; ``u32`` stored length) — W's itemsize planes,
then positions and values when the count is not zero — then the payloads. Packs of
``realign.frames/1`` and ``/2`` store positions and values element by element.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import threading
from dataclasses import dataclass
from typing import Any

import zstandard

from app.residuals import native, nibbles

FRAME_ELEMS = 1 << 20
"""Elements per frame: small enough to decode into cache-sized buffers, big enough for zstd."""
# Measured on residual planes (bench/packs.py): zstd's fast strategy with a tiny match table
# codes the exponent plane to ~0.33 at ~2.5x the speed of level 1 (which gives ~0.36): such a
# plane has few repeats for LZ to find, and its gain is in zstd's entropy coding. The nibble
# code keeps 0.5 of it at a sixth of zstd's cost (0.23 against 1.4 ns/byte to code, 0.07
# against 0.6 to decode): zstd was most of an exact pack's compute.
_PARAMS = zstandard.ZstdCompressionParameters(
    strategy=zstandard.STRATEGY_FAST, window_log=17, hash_log=6, min_match=7, search_log=1
)
_KEEP = 0.95  # a compressed payload is kept only when at most this fraction of the raw size
MANTISSA_KEEP = 0.5
"""A mantissa plane is coded only where a tensor's first frame shrank it to this fraction."""
_PROBE = 1 << 16  # bytes of a tensor's first mantissa plane that zstd tries
_SECTION = struct.Struct("<BI")
_COUNT = struct.Struct("<I")
_RAW, _ZSTD, _NIBBLES = 0, 1, 2
_BY_PLANE = 0x80  # mode flag of correction sections stored by byte plane (frames/3)
PLANE_CORRECTIONS = True
"""Store corrections by byte plane (``realign.frames/3``); False only to write the earlier
layout in compatibility tests."""
Coding = bool | bytes
"""How a later frame codes one byte plane: ``False`` raw, ``True`` zstd where it wins,
``bytes`` nibbles with that alphabet (zstd where too many bytes escape it)."""
_local = threading.local()


class FrameError(ValueError):
    """A frame that does not decode to what its index says (a damaged file)."""


def _compressor() -> Any:
    z = getattr(_local, "z", None)
    if z is None:
        z = _local.z = zstandard.ZstdCompressor(compression_params=_PARAMS)
    return z


def _decompressor() -> Any:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64


class FrameBuffers:
    """Where one frame is laid out (byte planes, correction gaps and values, then those two
    by byte plane) and its sign/exponent plane nibble-coded, reused frame after frame. An
    anonymous map: pages are faulted in once and the gaps and values, as long as the frame
    but mostly unused, take memory only where written."""

    def __init__(self) -> None:
        # planes, gaps, values, gaps by plane, values by plane, then the nibble section
        self._map = mmap.mmap(-1, FRAME_ELEMS * 4 * 5 + nibbles.section_bytes(FRAME_ELEMS))

    def views(self, n: int, itemsize: int) -> list[memoryview]:
        mem, top = memoryview(self._map), FRAME_ELEMS * 4
        return [
            mem[: n * itemsize],
            mem[top : top + 4 * n],
            mem[2 * top : 2 * top + n * itemsize],
            mem[3 * top : 3 * top + 4 * n],
            mem[4 * top : 4 * top + n * itemsize],
            mem[5 * top : 5 * top + nibbles.section_bytes(n)],
        ]


@dataclass(frozen=True)
class Laid:
    """A frame laid out in its :class:`FrameBuffers` (``lay_out``), ready to code."""

    n: int
    itemsize: int
    count: int  # non-zero corrections
    planes: list[memoryview]
    gaps: memoryview
    values: memoryview
    nibbles: memoryview  # room for the sign/exponent plane's nibble section
    by_plane: bool  # gaps and values are laid out by byte plane


def lay_out(p: memoryview, neg: memoryview | None, itemsize: int, buf: FrameBuffers) -> Laid:
    """Copy one frame of ``p`` and ``neg`` (``None``: all +0; ``n`` elements of
    ``itemsize`` bytes each) into ``buf`` as byte planes and sparse corrections: after
    this, the caller's buffers are free again."""
    n = p.nbytes // itemsize
    planes, gaps, values, gap_planes, value_planes, coded = buf.views(n, itemsize)
    _planes(p, n, itemsize, planes)
    count = 0
    if neg is not None:
        count = native.function("realign_sparse", (_P, _I64, _I32, _P, _P), _I64)(
            native.address(neg), n, itemsize,
            native.address(gaps, writable=True), native.address(values, writable=True),
        )  # fmt: skip
    by_plane = PLANE_CORRECTIONS
    if count and by_plane:
        _planes(gaps, count, 4, gap_planes)
        _planes(values, count, itemsize, value_planes)
        gaps, values = gap_planes, value_planes
    layout = [planes[j * n : (j + 1) * n] for j in range(itemsize)]
    gaps, values = gaps[: 4 * count], values[: count * itemsize]
    return Laid(n, itemsize, count, layout, gaps, values, coded, by_plane)


def _planes(src: memoryview, n: int, itemsize: int, out: memoryview) -> None:
    """Byte ``j`` of each of the ``n`` elements of ``src`` to plane ``j`` of ``out``."""
    native.function("realign_planes", (_P, _I64, _I32, _P), None)(
        native.address(src), n, itemsize, native.address(out, writable=True)
    )


def _section(raw: memoryview, attempt: bool = True) -> tuple[int, bytes | memoryview]:
    if attempt:
        packed: bytes = _compressor().compress(raw)
        if len(packed) <= _KEEP * raw.nbytes:
            return _ZSTD, packed
    return _RAW, raw


def _shrinks(plane: memoryview) -> bool:
    """Whether zstd takes a mantissa plane to :data:`MANTISSA_KEEP` or less, from its first
    :data:`_PROBE` bytes (residual mantissas are mostly noise: coding them all to find out
    would cost a tenth of a pack's compute)."""
    if plane.nbytes <= _PROBE:
        return True
    return len(_compressor().compress(plane[:_PROBE])) <= MANTISSA_KEEP * _PROBE


def _plane(laid: Laid, j: int, coding: Coding | None) -> tuple[int, bytes | memoryview]:
    raw = laid.planes[j]
    if coding is None:  # a tensor's first frame: every plane tries
        coding = (nibbles.alphabet(raw) or True) if j == laid.itemsize - 1 else _shrinks(raw)
    if isinstance(coding, bytes):
        coded = nibbles.encode(raw, coding, laid.nibbles)
        if coded is not None:  # a plane of a few bytes is smaller raw (the alphabet's cost)
            return (_NIBBLES, coded) if coded.nbytes < raw.nbytes else (_RAW, raw)
        coding = True
    return _section(raw, coding)


def worth_coding(pieces: list[bytes | memoryview], n: int, itemsize: int) -> tuple[Coding, ...]:
    """How the later frames of a tensor should code the byte planes of ``p``, from its first
    frame (of ``n`` elements; its pieces from :func:`code_frame`): the sign/exponent plane
    with the first frame's alphabet where it took the nibble code, else zstd; a mantissa
    plane with zstd only where it shrank to :data:`MANTISSA_KEEP` or less (else coding
    costs time for little)."""
    heads = [_SECTION.unpack_from(pieces[0], 4 + k * 5) for k in range(itemsize)]
    plan: list[Coding] = []
    for j, (mode, length) in enumerate(heads):
        if mode == _NIBBLES:
            plan.append(nibbles.alphabet_of(pieces[1 + j]))
        else:
            plan.append(j == itemsize - 1 or (mode == _ZSTD and length <= MANTISSA_KEEP * n))
    return tuple(plan)


def code_frame(laid: Laid, plan: tuple[Coding, ...] | None = None) -> list[bytes | memoryview]:
    """The bytes of a laid-out frame, in pieces to write one after the other: the header
    first, then one piece per section (what :func:`worth_coding` reads); raw and nibble
    sections are views of the frame's buffers.

    Args:
        plan: how to code each byte plane of ``p`` (:func:`worth_coding`); default: the
            first frame's way, every plane tried.
    """
    sections = [_plane(laid, j, None if plan is None else plan[j]) for j in range(laid.itemsize)]
    if laid.count:
        flag = _BY_PLANE if laid.by_plane else 0
        sections += [(m | flag, d) for m, d in (_section(laid.gaps), _section(laid.values))]
    head = b"".join(
        [_COUNT.pack(laid.count), *(_SECTION.pack(mode, len(data)) for mode, data in sections)]
    )
    return [head, *(data for _, data in sections)]


def encode_frame(
    p: memoryview, neg: memoryview | None, itemsize: int, plan: tuple[Coding, ...] | None = None
) -> tuple[bytes, int]:
    """One frame of ``p`` and ``neg`` (see :func:`lay_out`, :func:`code_frame`) as one
    ``bytes``, and how many ``neg`` elements are not +0."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = FrameBuffers()
    laid = lay_out(p, neg, itemsize, buf)
    return b"".join(code_frame(laid, plan)), laid.count


def _payload(mode: int, data: memoryview, size: int, j: int) -> memoryview | bytes | bytearray:
    if mode == _RAW:
        if data.nbytes != size:
            raise FrameError(f"a raw section holds {data.nbytes} bytes, {size} expected")
        return data
    if mode == _NIBBLES:
        try:
            return nibbles.decode(data, size, j)
        except nibbles.NibbleError as exc:
            raise FrameError(str(exc)) from None
    if mode != _ZSTD:
        raise FrameError(f"unknown section mode {mode}")
    try:
        # A damaged header could claim any size, which decompress would allocate.
        claimed = zstandard.frame_content_size(data)
        if claimed not in (-1, size):
            raise FrameError(f"a section claims {claimed} bytes, {size} expected")
        out: bytes = _decompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise FrameError(f"zstd: {exc}") from None
    if len(out) != size:
        raise FrameError(f"a section decodes to {len(out)} bytes, {size} expected")
    return out


def decode_frame(
    frame: memoryview, n: int, itemsize: int, p_out: memoryview, neg_out: memoryview
) -> None:
    """Decode a frame of ``n`` elements into ``p_out`` and ``neg_out`` (``n * itemsize``
    writable bytes each).

    Raises:
        FrameError: the frame is damaged (sizes that disagree, bad zstd data).
    """
    try:
        (count,) = _COUNT.unpack_from(frame, 0)
        n_sections = itemsize + (2 if count else 0)
        heads = [_SECTION.unpack_from(frame, 4 + k * 5) for k in range(n_sections)]
    except struct.error as exc:
        raise FrameError(f"truncated frame header ({exc})") from None
    if count > n:
        raise FrameError(f"{count} corrections in a frame of {n} elements")
    at = 4 + 5 * n_sections
    sizes = [n] * itemsize + ([4 * count, itemsize * count] if count else [])
    flags = [mode & _BY_PLANE for mode, _ in heads]
    if any(flags[:itemsize]) or len(set(flags[itemsize:])) > 1:
        raise FrameError(f"section modes {[mode for mode, _ in heads]} mix their layouts")
    parts = []
    for j, ((mode, length), size) in enumerate(zip(heads, sizes, strict=True)):
        if at + length > frame.nbytes:
            raise FrameError("a section runs past the end of its frame")
        parts.append(_payload(mode & ~_BY_PLANE, frame[at : at + length], size, j))
        at += length
    if at != frame.nbytes:
        raise FrameError(f"{frame.nbytes - at} stray bytes after the last section")
    pointers = (ctypes.c_void_p * itemsize)(*(native.address(parts[j]) for j in range(itemsize)))
    native.function("realign_unplanes", (_P, _I64, _I32, _P), None)(
        pointers, n, itemsize, native.address(p_out, writable=True)
    )
    empty = bytearray(1)
    scatter = "realign_scatter_planes" if count and flags[itemsize] else "realign_scatter"
    bad = native.function(scatter, (_P, _P, _I64, _I64, _I32, _P), _I32)(
        native.address(parts[itemsize] if count else empty),
        native.address(parts[itemsize + 1] if count else empty),
        count, n, itemsize, native.address(neg_out, writable=True),
    )  # fmt: skip
    if bad:
        raise FrameError("a correction lies past the end of its frame")
