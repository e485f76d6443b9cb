"""The nibble code of exact packs' sign/exponent planes (the kernel: ``_native.c``).

A residual's sign/exponent byte takes few values, so each byte becomes 4 bits: its index
in an alphabet of the plane's (at most) 15 most frequent values, or 15, an escape, the
byte itself then following the codes. Half the plane's size, where zstd reaches about a
third, at a sixth of zstd's cost to code and a tenth to decode (``bench/RESULTS.md``).

A section is ``u8`` k, the alphabet's k bytes, ``u32`` escapes, the codes (two per byte,
the first in the low nibble, an odd count padded with a 0 nibble), then the escaped
bytes in order.
"""

from __future__ import annotations

import ctypes
import struct
import threading

from app.residuals import native

ESCAPES = 1 / 32
"""A plane is nibble-coded where its tensor's first frame leaves at most this share of its
bytes out of the alphabet (else zstd codes it)."""
_CAP = 8  # a later frame escaping more than 1/8 of its bytes falls back to zstd
_COUNT = struct.Struct("<I")
_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
_local = threading.local()


class NibbleError(ValueError):
    """A nibble section that does not decode (a damaged frame)."""


def section_bytes(n: int) -> int:
    """The most a section of ``n`` bytes takes before it falls back to zstd."""
    return 1 + 15 + 4 + (n + 1) // 2 + n // _CAP


def alphabet(plane: memoryview) -> bytes | None:
    """The alphabet for a sign/exponent plane, or None where too many of its bytes would
    escape it (see :data:`ESCAPES`)."""
    alpha, escaped = bytearray(15), ctypes.c_int64()
    k = native.function("realign_nib_alphabet", (_P, _I64, _P, _P), _I32)(
        native.address(plane), plane.nbytes, native.address(alpha, writable=True),
        ctypes.addressof(escaped),
    )  # fmt: skip
    return bytes(alpha[:k]) if escaped.value <= ESCAPES * plane.nbytes else None


def encode(plane: memoryview, alpha: bytes, out: memoryview) -> memoryview | None:
    """``plane`` as a section in ``out`` (:func:`section_bytes` long), or None where more
    than 1/8 of its bytes escape ``alpha``."""
    n, k = plane.nbytes, len(alpha)
    at = 1 + k + 4
    codes = (n + 1) // 2
    escaped = native.function("realign_nib_encode", (_P, _I64, _P, _I32, _P, _P, _I64), _I64)(
        native.address(plane), n, native.address(alpha), k,
        native.address(out[at:], writable=True), native.address(out[at + codes :], writable=True),
        n // _CAP,
    )  # fmt: skip
    if escaped < 0:
        return None
    out[0] = k
    out[1 : 1 + k] = alpha
    _COUNT.pack_into(out, 1 + k, escaped)
    return out[: at + codes + escaped]


def alphabet_of(section: bytes | memoryview) -> bytes:
    """The alphabet a section was coded with."""
    return bytes(section[1 : 1 + section[0]])


def decode(data: memoryview, size: int, slot: int) -> bytearray:
    """A section of ``size`` bytes decoded into this thread's buffer number ``slot`` (valid
    until that buffer's next use on this thread).

    Raises:
        NibbleError: a damaged section (lengths, codes or escapes that disagree).
    """
    k = data[0] if data.nbytes else 0
    try:
        (escaped,) = _COUNT.unpack_from(data, 1 + k)
    except struct.error:
        raise NibbleError("a truncated nibble section") from None
    at, codes = 1 + k + 4, (size + 1) // 2
    if k > 15 or data.nbytes != at + codes + escaped:
        raise NibbleError(f"a nibble section of {data.nbytes} bytes for {size} ({k}, {escaped})")
    buffers: dict[int, bytearray] = _local.__dict__.setdefault("buffers", {})
    out = buffers.get(slot)
    if out is None or len(out) < size:
        out = buffers[slot] = bytearray(size)
    bad = native.function("realign_nib_decode", (_P, _I64, _P, _I32, _P, _I64, _P), _I32)(
        native.address(data[at:]), size, native.address(data[1:]), k,
        native.address(data[at + codes :] if escaped else data), escaped,
        native.address(out, writable=True),
    )  # fmt: skip
    if bad:
        raise NibbleError("a nibble section that does not decode (codes or escapes)")
    return out
