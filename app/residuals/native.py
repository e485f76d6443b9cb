"""The native element-wise merge kernel (``_native.c``), called through ctypes.

ctypes releases the GIL for the duration of a call, so several threads can merge at once.
The kernel rounds the exact value of each element once to the output dtype (see
:mod:`app.residuals.exact` for the contract); the rare elements it cannot prove are
evaluated here with rational arithmetic. Importing this module loads nothing heavy: when the
extension was not built, :func:`available` is False and :func:`load_error` says why.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import math
import threading
from collections.abc import Sequence
from typing import Any

from app.residuals import exact

CODES = {"F32": 0, "BF16": 1, "F16": 2}
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}
# Which of the kernel's operands (x0, x1, x2 of x2 + a*(x0 - x1)) each kind's inputs fill.
SLOTS: dict[str, tuple[int, ...]] = {
    "residual": (0, 1),
    "apply": (0, 2),
    "fused": (0, 1, 2),
    "convert": (0,),
}
ROLES: dict[str, tuple[str, ...]] = {
    "residual": ("instruct", "base"),
    "apply": ("residual", "target"),
    "fused": ("instruct", "base", "target"),
    "convert": ("input",),
}
# Hard-element indices one kernel call may report; it stops early rather than overflow.
HARD_CAPACITY = 65536

_local = threading.local()
_Stats = ctypes.c_double * 2


class _Kernel:
    """The loaded extension: buffer-address helpers and the ctypes entry point."""

    def __init__(self, module: Any, lib: Any, combine: Any, split: Any, residual: Any) -> None:
        self.lib = lib
        self.address = module.address
        self.writable_address = module.writable_address
        self.combine = combine
        self.split = split
        self.residual = residual


_CODEC = (
    "realign_planes", "realign_unplanes", "realign_sparse", "realign_scatter",
    "realign_scatter_planes", "realign_nib_alphabet", "realign_nib_encode", "realign_nib_decode",
)  # fmt: skip
"""The exact packs' frame codec functions (called through :func:`function`)."""


@functools.cache
def _load() -> tuple[_Kernel | None, str | None]:
    try:
        module = importlib.import_module("app.residuals._native")
        lib = ctypes.CDLL(module.__file__)
        fn, split = lib.realign_combine, lib.realign_exact_split
        residual = lib.realign_exact_residual
        for name in _CODEC:  # a library built from older sources lacks some: stale
            getattr(lib, name)
    except (ImportError, OSError, AttributeError) as exc:
        return None, (
            f"the native merge kernel app.residuals._native is not built or is stale ({exc}); "
            "install a C compiler (gcc or clang) and reinstall realign "
            "(pip install --no-build-isolation -e . in a checkout) to build it; "
            "until then merges run on the torch backend"
        )
    ptr, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
    # out, x0, x1, x2 (each with its dtype code), alpha, start, end, want_stats, stats,
    # hard indices, their capacity, their count
    fn.argtypes = [ptr, i32, ptr, i32, ptr, i32, ptr, i32, f32, i64, i64, i32, ptr, ptr, i64, ptr]
    fn.restype = i64
    # x0, its code, x1, its code, the code of p and neg, p (in/out), neg (out), n
    split.argtypes = [ptr, i32, ptr, i32, i32, ptr, ptr, i64]
    split.restype = i64
    # the same, then want_stats and the statistics
    residual.argtypes = [*split.argtypes, i32, ptr]
    residual.restype = i64
    return _Kernel(module, lib, fn, split, residual), None


@functools.cache
def function(name: str, argtypes: tuple[Any, ...], restype: Any) -> Any:
    """A C function of the kernel's library by name (see ``_native.c``), typed for ctypes.

    Raises:
        RuntimeError: the kernel is not built (the message says what to do).
    """
    kernel, error = _load()
    if kernel is None:
        raise RuntimeError(error)
    fn = getattr(kernel.lib, name)
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn


def address(buf: memoryview | bytes | bytearray, *, writable: bool = False) -> int:
    """The address of a C-contiguous buffer, for calls through :func:`function`.

    Raises:
        RuntimeError: the kernel is not built.
        ValueError: not a C-contiguous (and, with ``writable``, writable) buffer.
    """
    kernel, error = _load()
    if kernel is None:
        raise RuntimeError(error)
    return _address(kernel, memoryview(buf), "buffer", writable=writable)


def available() -> bool:
    """Whether the native kernel is built and loads."""
    return _load()[0] is not None


def load_error() -> str | None:
    """Why the native kernel is unavailable and what to do, or None when it loads."""
    return _load()[1]


def _hard_buffer() -> ctypes.Array[ctypes.c_int64]:
    size = max(1, HARD_CAPACITY)  # the kernel moves on by at least one element per call
    buf: ctypes.Array[ctypes.c_int64] | None = getattr(_local, "hard", None)
    if buf is None or len(buf) != size:
        buf = (ctypes.c_int64 * size)()
        _local.hard = buf
    return buf


def _bytes_view(buf: memoryview, what: str) -> memoryview:
    try:
        return buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
    except TypeError as exc:
        raise ValueError(f"{what}: needs a C-contiguous buffer ({exc})") from None


def _address(kernel: _Kernel, view: memoryview, what: str, *, writable: bool = False) -> int:
    try:
        return int(kernel.writable_address(view) if writable else kernel.address(view))
    except BufferError as exc:
        need = "a writable C-contiguous" if writable else "a C-contiguous"
        raise ValueError(f"{what}: needs {need} buffer ({exc})") from None


def _itemsize(code: str, what: str) -> int:
    if code not in ITEMSIZE:
        raise ValueError(f"{what}: unknown dtype code {code!r}; expected one of F32, BF16, F16")
    return ITEMSIZE[code]


def _alpha32(kind: str, alpha: float) -> float:
    if kind in ("residual", "convert"):
        return 1.0
    a32 = exact.to_f32(alpha)
    if not math.isfinite(a32):
        raise ValueError(
            f"{kind}: alpha {alpha!r} is not a finite fp32 number; pass a finite scale"
        )
    return a32


def _operands(
    kernel: _Kernel, kind: str, inputs: Sequence[tuple[memoryview, str]], n: int
) -> tuple[list[Any], list[tuple[memoryview, str]]]:
    """The kernel's (address, code) arguments for x0, x1, x2, and the inputs' byte views."""
    roles = ROLES[kind]
    if len(inputs) != len(roles):
        raise ValueError(
            f"{kind} takes {len(roles)} inputs ({', '.join(roles)}), got {len(inputs)}"
        )
    args: list[Any] = [None, 0, None, 0, None, 0]
    views: list[tuple[memoryview, str]] = []
    for (buf, code), slot, role in zip(inputs, SLOTS[kind], roles, strict=True):
        view = _bytes_view(buf, role)
        size = _itemsize(code, role)
        if view.nbytes != n * size:
            raise ValueError(
                f"{role}: {view.nbytes} bytes, but out holds {n} elements, so {n * size} bytes "
                f"of {code} are expected"
            )
        args[2 * slot], args[2 * slot + 1] = _address(kernel, view, role), CODES[code]
        views.append((view, code))
    return args, views


def combine(
    kind: str,
    out: memoryview,
    out_code: str,
    inputs: Sequence[tuple[memoryview, str]],
    alpha: float = 1.0,
    *,
    want_stats: bool = False,
) -> tuple[float, float]:
    """Merge element-wise into ``out``, each element the exact value rounded once.

    Args:
        kind: ``residual`` (instruct, base), ``apply`` (residual, target), ``fused``
            (instruct, base, target) or ``convert`` (input,).
        out: writable C-contiguous buffer of ``n`` elements of ``out_code``.
        out_code: ``"F32"``, ``"BF16"`` or ``"F16"``.
        inputs: ``(buffer, code)`` per input, in the kind's order, ``n`` elements each; the
            buffers may be read-only (bytes, a read-only mmap).
        alpha: the scale of ``apply`` and ``fused`` (rounded once to fp32).
        want_stats: also return the statistics of the plain fp32 formula.

    Returns:
        ``(sum of squares, max abs)`` of the plain fp32 formula over the elements when
        ``want_stats``, else ``(0.0, 0.0)``.

    Raises:
        ValueError: unknown kind or dtype code, wrong number of inputs, sizes that disagree,
            a read-only or non-contiguous buffer, or a non-finite alpha.
        RuntimeError: the kernel is not built (the message says what to do).
    """
    kernel, error = _load()
    if kernel is None:
        raise RuntimeError(error)
    if kind not in SLOTS:
        raise ValueError(f"unknown kind {kind!r}: expected one of {', '.join(SLOTS)}")
    out_b = _bytes_view(out, "out")
    n, rest = divmod(out_b.nbytes, _itemsize(out_code, "out"))
    if rest:
        raise ValueError(f"out: {out_b.nbytes} bytes is not a whole number of {out_code} elements")
    a32 = _alpha32(kind, alpha)
    args, views = _operands(kernel, kind, inputs, n)
    out_addr = _address(kernel, out_b, "out", writable=True)
    stats = _Stats(0.0, 0.0)
    hard, n_hard = _hard_buffer(), ctypes.c_int64(0)
    start = 0
    while True:  # more than once only when the hard-index buffer fills up
        stop = kernel.combine(
            out_addr, CODES[out_code], *args, a32, start, n, int(want_stats), stats, hard,
            len(hard), ctypes.byref(n_hard),
        )  # fmt: skip
        _fix_hard(kind, out_b, out_code, views, alpha, hard[: n_hard.value])
        if stop >= n:
            break
        start = stop
    return (stats[0], stats[1]) if want_stats else (0.0, 0.0)


def _fix_hard(
    kind: str,
    out: memoryview,
    out_code: str,
    views: Sequence[tuple[memoryview, str]],
    alpha: float,
    indices: Sequence[int],
) -> None:
    """Evaluate the elements the kernel could not prove, exactly, and store their bits."""
    size = ITEMSIZE[out_code]
    for i in indices:
        xs = []
        for view, code in views:
            k = ITEMSIZE[code]
            xs.append(exact.decode(int.from_bytes(view[i * k : (i + 1) * k], "little"), code))
        bits = exact.element_bits(kind, xs, alpha, out_code)
        out[i * size : (i + 1) * size] = bits.to_bytes(size, "little")


def _pair_args(
    kernel: _Kernel,
    instruct: memoryview,
    base: memoryview,
    code: str,
    p: memoryview,
    neg: memoryview,
    codes: tuple[str, str] | None,
) -> list[Any] | None:
    """The kernel's x0, code0, x1, code1, code, p, neg, n arguments (None: no elements)."""
    size = _itemsize(code, "p")
    c0, c1 = codes or (code, code)
    views = [_bytes_view(v, w) for v, w in ((instruct, "instruct"), (base, "base"), (p, "p"))]
    neg_b = _bytes_view(neg, "neg")
    n = views[2].nbytes // size
    sizes = (_itemsize(c0, "instruct"), _itemsize(c1, "base"), size, size)
    if any(v.nbytes != n * k for v, k in zip((*views, neg_b), sizes, strict=True)):
        raise ValueError(f"exact split: inputs and outputs must all hold {n} elements")
    if n == 0:
        return None
    return [
        _address(kernel, views[0], "instruct"),
        CODES[c0],
        _address(kernel, views[1], "base"),
        CODES[c1],
        CODES[code],
        _address(kernel, views[2], "p", writable=True),
        _address(kernel, neg_b, "neg", writable=True),
        n,
    ]


def exact_split(
    instruct: memoryview,
    base: memoryview,
    code: str,
    p: memoryview,
    neg: memoryview,
    codes: tuple[str, str] | None = None,
) -> int:
    """Complete ``p = RN(instruct - base)`` (the ``residual`` kind's output, all of dtype
    ``code``) into an exact pair: writes ``neg`` so that ``p - neg == instruct - base``
    exactly, both in ``code`` (where the difference overflowed, ``p`` and ``neg`` become
    the inputs themselves). A fused merge of ``(p, neg)`` then gives the fused merge's
    bits of ``(instruct, base)``. ``codes``: the inputs' own dtype codes when narrower
    than ``code`` (default: ``code``).

    Returns:
        How many ``neg`` elements are not +0.

    Raises:
        ValueError: sizes that disagree, an unknown code, read-only outputs.
        RuntimeError: the kernel is not built.
    """
    kernel, error = _load()
    if kernel is None:
        raise RuntimeError(error)
    args = _pair_args(kernel, instruct, base, code, p, neg, codes)
    return int(kernel.split(*args)) if args else 0


def exact_residual(
    instruct: memoryview,
    base: memoryview,
    code: str,
    p: memoryview,
    neg: memoryview,
    codes: tuple[str, str] | None = None,
    *,
    want_stats: bool = False,
) -> tuple[int, tuple[float, float]]:
    """Write both ``p``, the ``residual`` kind's output, and the ``neg`` that
    :func:`exact_split` completes it with, in one pass over the inputs (same arguments).

    Returns:
        How many ``neg`` elements are not +0, and the ``residual`` kind's statistics
        (``(0.0, 0.0)`` unless ``want_stats``).

    Raises:
        ValueError: sizes that disagree, an unknown code, read-only outputs.
        RuntimeError: the kernel is not built.
    """
    kernel, error = _load()
    if kernel is None:
        raise RuntimeError(error)
    args = _pair_args(kernel, instruct, base, code, p, neg, codes)
    stats = _Stats(0.0, 0.0)
    if not args:
        return 0, (0.0, 0.0)
    count = kernel.residual(*args, int(want_stats), stats)
    return int(count), (stats[0], stats[1]) if want_stats else (0.0, 0.0)
