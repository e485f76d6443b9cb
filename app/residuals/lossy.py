"""Lossy residual formats: R stored in a few bits per element, opt-in (``--pack int8``,
``int4``, ``bitdelta``), for packs a fraction of the bf16 size.

Each format codes a residual tensor viewed as ``(rows, cols)`` (dimension 0 by the
rest) row by row, so the streaming pipeline can code it chunk by chunk:

* :class:`Absmax` — symmetric absmax integers: each group of ``group`` elements along a
  row (or the whole row, ``group=0``) gets an fp32 scale ``max|R| / qmax`` and codes
  ``round(R / scale)`` in ``[-qmax, qmax]`` (qmax = 127 for 8 bits, 7 for 4 bits), so
  each element is off by at most half its scale. 4-bit codes are stored two per byte
  (low nibble first) offset by 8.
* :class:`SignMean` — BitDelta (Liu et al. 2024, "BitDelta: Your Fine-Tune May Only Be
  Worth One Bit", NeurIPS 2024, arXiv:2402.10193): the sign of each element, one bit, times one fp32
  scale per row, the row's mean ``|R|`` (the scale that minimises the L2 error for those
  signs). The paper uses one scale per weight matrix and then distils the scales; here a
  scale per row, fixed at ``mean|R|`` (no distillation: a pack is a pure function of its
  inputs).

The group sizes are fixed per format name (the name is part of the content key), chosen
by measurement (bench/lossy.py, bench/RESULTS.md "Lossy residual packs"): int8 per 128
elements — against a scale per row, +0.25 bit per element for an error of R 26 % lower
on Gaussian rows of real width (4096), 3.1x lower on heavy-tailed ones, 5 % on the demo
models' short rows; int4 per 64 — the lowest error of R and of the merged model's KL of
the variants measured, +0.25 bit against 128.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from app.core.errors import InvalidParameterError
from app.residuals.dtypes import DTYPES, F32, DType

ScaleRule = Literal["absmax", "mean-abs"]
NUMPY = {"I8": np.int8, "U8": np.uint8, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
"""The numpy type of each stored part's dtype (bf16 as its bits)."""


class LossyFormat(Protocol):
    """How one lossy format codes the rows of a residual tensor."""

    @property
    def name(self) -> str:
        """The format's name (a value of ``--pack``)."""
        ...

    @property
    def bits(self) -> int:
        """Bits per coded element."""
        ...

    @property
    def group(self) -> int:
        """Elements per scale along a row; 0: one scale per row."""
        ...

    @property
    def scale(self) -> ScaleRule:
        """How each scale is set."""
        ...

    @property
    def code_dtype(self) -> DType:
        """The safetensors type of the codes tensor."""
        ...

    def code_cols(self, cols: int) -> int:
        """Columns of the codes tensor of rows of ``cols`` elements."""
        ...

    def scale_cols(self, cols: int) -> int:
        """Scales per row of ``cols`` elements."""
        ...

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes and fp32 scales of the fp32 rows ``x`` (``(rows, cols)``)."""
        ...

    def decode(self, codes: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
        """Write the fp32 rows that ``codes`` and ``scales`` stand for into ``out``
        (``(rows, cols)``): each element ``code * scale``, one fp32 product."""
        ...

    def describe(self) -> str:
        """One line for people: ``8-bit absmax, an fp32 scale per row``."""
        ...


def _check_finite(stats: np.ndarray) -> None:
    """Refuse rows whose scale statistic is not finite (an inf or NaN in them)."""
    if not np.isfinite(stats).all():
        raise InvalidParameterError(
            "instruct - base has inf or NaN elements, which a lossy pack cannot hold — "
            "check the models' weights, or use --pack exact (it keeps them as they are)"
        )


def _grouped(x: np.ndarray, group: int) -> np.ndarray:
    """``x`` as ``(rows, groups, group)``, the last group padded with zeros."""
    rows, cols = x.shape
    size = group or max(cols, 1)
    pad = -cols % size
    if pad:
        x = np.concatenate([x, np.zeros((rows, pad), np.float32)], axis=1)
    return x.reshape(rows, -1, size)


@dataclass(frozen=True)
class Absmax:
    """Symmetric absmax integers of ``bits`` bits (8 or 4), a scale per ``group``."""

    name: str
    bits: int
    group: int
    scale: ScaleRule = "absmax"

    @property
    def qmax(self) -> int:
        return int(2 ** (self.bits - 1) - 1)

    @property
    def code_dtype(self) -> DType:
        return DTYPES["I8"] if self.bits == 8 else DTYPES["U8"]

    def code_cols(self, cols: int) -> int:
        return cols if self.bits == 8 else (cols + 1) // 2

    def scale_cols(self, cols: int) -> int:
        return math.ceil(cols / self.group) if self.group else 1

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = x.shape
        g = _grouped(x, self.group)
        amax = np.abs(g).max(axis=2) if g.size else np.zeros(g.shape[:2], np.float32)
        _check_finite(amax)
        scales = (amax / np.float32(self.qmax)).astype(np.float32)
        safe = np.where(scales > 0, scales, np.float32(1))
        q = np.rint(g / safe[:, :, None]).reshape(rows, -1)[:, :cols]
        q = np.clip(q, -self.qmax, self.qmax).astype(np.int8)
        if self.bits == 8:
            return q, scales
        u = (q + 8).astype(np.uint8)
        if cols % 2:
            u = np.concatenate([u, np.full((rows, 1), 8, np.uint8)], axis=1)
        return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8), scales

    def decode(self, codes: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
        rows, cols = out.shape
        if self.bits == 8:
            q = codes
        else:
            q = np.empty((rows, 2 * codes.shape[1]), np.int8)
            q[:, 0::2] = codes & 0x0F
            q[:, 1::2] = codes >> 4
            q = q[:, :cols] - np.int8(8)
        _scaled(q, scales, self.group, out)

    def describe(self) -> str:
        per = f"{self.group} elements" if self.group else "row"
        return f"{self.bits}-bit absmax, an fp32 scale per {per}"


@dataclass(frozen=True)
class SignMean:
    """BitDelta: one sign bit per element, the row's mean ``|R|`` as its fp32 scale."""

    name: str
    bits: int = 1
    group: int = 0
    scale: ScaleRule = "mean-abs"

    @property
    def code_dtype(self) -> DType:
        return DTYPES["U8"]

    def code_cols(self, cols: int) -> int:
        return (cols + 7) // 8

    def scale_cols(self, cols: int) -> int:
        return 1 if cols else 0

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = x.shape
        mean = np.abs(x).mean(axis=1, dtype=np.float64) if cols else np.zeros(rows)
        _check_finite(mean)
        bits = np.packbits(x >= 0, axis=1, bitorder="little")  # +0 and -0 code as +
        return bits, mean.astype(np.float32).reshape(rows, 1)

    def decode(self, codes: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
        cols = out.shape[1]
        bits = np.unpackbits(codes, axis=1, count=cols, bitorder="little")
        signs = bits.astype(np.int8) * np.int8(2) - np.int8(1)
        _scaled(signs, scales, 0, out)

    def describe(self) -> str:
        return "BitDelta: 1-bit signs, an fp32 scale (mean |R|) per row"


def _scaled(q: np.ndarray, scales: np.ndarray, group: int, out: np.ndarray) -> None:
    """``out = q * scale`` (fp32), each element by the scale of its group."""
    rows, cols = out.shape
    assert out.flags.c_contiguous, "decoded rows go to a contiguous buffer"
    if not group or cols % group == 0:
        size = group or max(cols, 1)
        view = out.reshape(rows, -1, size)
        np.multiply(q.reshape(view.shape), scales[:, :, None], out=view, dtype=np.float32)
        return
    full = np.repeat(scales, group, axis=1)[:, :cols]
    np.multiply(q, full, out=out, dtype=np.float32)


# A format's parameters decide what its packs hold and its name is what the content key
# holds: a change of parameters takes a new name (or a bump of the key schema).
FORMATS: dict[str, LossyFormat] = {
    f.name: f
    for f in (
        Absmax("int8", 8, 128),
        Absmax("int4", 4, 64),
        SignMean("bitdelta"),
    )
}
"""The lossy pack formats by name (a value of ``--pack``)."""


def lossy_format(dtype: DType | str) -> LossyFormat | None:
    """The lossy format a pack dtype names, or None (exact and float packs)."""
    return FORMATS.get(dtype if isinstance(dtype, str) else dtype.name)


def quantized(shape: tuple[int, ...]) -> bool:
    """Whether a lossy pack codes a tensor of ``shape``: matrices and up; vectors (norm
    scales, biases) are kept in fp32, where a scale per row would cost more than the
    values."""
    return len(shape) >= 2


def rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """A tensor as ``(rows, cols)``: dimension 0 by the product of the others (a
    scalar: one row of one)."""
    return (shape[0] if shape else 1), math.prod(shape[1:])


def rows_dtype(instruct: DType) -> DType:
    """The dtype a lossy pack keeps added vocabulary rows in: the instruct side's own
    where the pipeline's fp32 rows convert back exactly, else fp32."""
    return instruct if instruct.code in ("BF16", "F16", "F32") else F32


def narrow(x: np.ndarray, dtype: DType) -> memoryview:
    """fp32 rows widened from ``dtype`` back to ``dtype``'s bytes (exact)."""
    if dtype.code == "BF16":  # the low half of a widened bf16 is zero
        out = (x.view(np.uint32) >> 16).astype(np.uint16)
    else:
        out = np.ascontiguousarray(x, dtype=NUMPY[dtype.code])
    return out.data.cast("B")


def widen(kept: np.ndarray, dtype: DType) -> np.ndarray:
    """Rows of ``dtype`` (as stored) widened to fp32, exactly."""
    if dtype.code == "BF16":
        return (kept.astype(np.uint32) << 16).view(np.float32)
    return kept.astype(np.float32)
