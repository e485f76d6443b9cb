"""Lossy residual packs on disk: safetensors shards of codes and fp32 scales.

For each residual tensor ``name`` of two or more dimensions a lossy pack holds, in one
shard:

* ``name::codes`` — the coded rows below ``common_rows`` (``I8`` for int8, ``U8`` for
  int4 and bitdelta, packed along the row; see :mod:`app.residuals.lossy`),
* ``name::scales`` — their fp32 scales, ``(common_rows, scales per row)``,
* ``name::rows`` — only where the instruct side added vocabulary rows: those rows, the
  instruct values in the instruct dtype, kept exact.

Vectors (norm scales, biases) are stored as ``name``, R in fp32, as a float32 pack
stores them.

:class:`LossyWriter` takes the fp32 rows of R from the streaming pipeline, codes them
and measures the error of what it stored (:class:`PackFidelity`). :class:`LossyPack`
reads such a pack as a :class:`Checkpoint` of fp32 residual tensors: ``read_into``
decodes the rows asked for, so every reader of packs plans plain ``apply`` jobs of
``(r, target)`` with it. Its parts are read through the pack's read verifier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.core.errors import CorruptCheckpointError
from app.residuals.checkpoint import Checkpoint, TensorInfo
from app.residuals.dtypes import F32, DType
from app.residuals.lossy import NUMPY, LossyFormat, narrow, quantized, rows_cols, rows_dtype, widen
from app.residuals.manifest import PackFidelity, ResidualManifest
from app.residuals.shards import Closing, ShardedWriter, TensorSpec
from app.residuals.tensorjobs import TensorJob

CODES, SCALES, ROWS = "::codes", "::scales", "::rows"


@dataclass
class _Coding:
    """One residual tensor on its way into a lossy pack."""

    name: str
    shape: tuple[int, ...]
    common: int
    extra: DType
    done: int = 0  # rows received
    scales: list[np.ndarray] = field(default_factory=list)
    err2: float = 0.0
    ref2: float = 0.0

    @property
    def cols(self) -> int:
        return rows_cols(self.shape)[1]


class LossyWriter(Closing):
    """Writes the lossy pack of residual ``jobs`` (fp32 rows, in job order) into
    ``directory``; hashes every file while writing (see :class:`ShardedWriter`).

    Args:
        directory: an existing, empty directory.
        jobs: the residual jobs, their specs in fp32.
        fmt: the lossy format.
        prefix: shard file stem.
        max_shard_bytes: largest shard; a tensor's parts always share a shard.
    """

    def __init__(
        self,
        directory: Path,
        jobs: list[TensorJob],
        fmt: LossyFormat,
        *,
        prefix: str,
        max_shard_bytes: int,
    ) -> None:
        self.fmt = fmt
        self._coding = {
            j.spec.name: _Coding(
                j.spec.name, j.spec.shape, j.common_rows, rows_dtype(j.inputs[0].info.dtype)
            )
            for j in jobs
        }
        specs = [s for c in self._coding.values() for s in self._specs(c)]
        self._inner = ShardedWriter(
            directory,
            specs,
            prefix=prefix,
            max_shard_bytes=max_shard_bytes,
            joined=lambda s: s.name.endswith((SCALES, ROWS)),
        )
        # What the inner writer reports per file, filled in as it writes.
        self.sizes, self.sha256, self.xxh3 = self._inner.sizes, self._inner.sha256, self._inner.xxh3

    def _specs(self, c: _Coding) -> list[TensorSpec]:
        if not quantized(c.shape):
            return [TensorSpec(c.name, F32, c.shape)]
        rows, cols = rows_cols(c.shape)
        specs = [
            TensorSpec(c.name + CODES, self.fmt.code_dtype, (c.common, self.fmt.code_cols(cols))),
            TensorSpec(c.name + SCALES, F32, (c.common, self.fmt.scale_cols(cols))),
        ]
        if rows > c.common:
            specs.append(TensorSpec(c.name + ROWS, c.extra, (rows - c.common, *c.shape[1:])))
        return specs

    def stored_dtypes(self) -> dict[str, str]:
        """Per residual tensor, what the manifest records as its dtype: the format's
        name, or ``float32`` for a vector kept as it is."""
        name = self.fmt.name
        return {n: name if quantized(c.shape) else F32.name for n, c in self._coding.items()}

    def write(self, name: str, data: memoryview) -> None:
        """Take the next fp32 rows of residual ``name`` (whole rows)."""
        c = self._coding[name]
        if not data.nbytes:  # rows of no elements: nothing to code
            return
        x = np.frombuffer(data, dtype=np.float32).reshape(-1, c.cols)
        coded = max(0, min(len(x), c.common - c.done))
        if not quantized(c.shape):  # kept in fp32: no error, but part of |R|
            c.ref2 += float(np.square(x[:coded]).sum(dtype=np.float64))
            self._inner.write(name, data)
            c.done += len(x)
            return
        if coded:
            self._code(c, x[:coded])
        if coded < len(x):  # rows the instruct side added: its values, exactly
            self._inner.write(name + ROWS, narrow(x[coded:], c.extra))
        c.done += len(x)

    def _code(self, c: _Coding, x: np.ndarray) -> None:
        codes, scales = self.fmt.encode(x)
        back = np.empty_like(x)
        self.fmt.decode(codes, scales, back)
        c.err2 += float(np.square(back - x).sum(dtype=np.float64))
        c.ref2 += float(np.square(x).sum(dtype=np.float64))
        self._inner.write(c.name + CODES, np.ascontiguousarray(codes).data.cast("B"))
        c.scales.append(scales)
        if c.done + len(x) == c.common:
            joined = np.ascontiguousarray(np.concatenate(c.scales), dtype=np.float32)
            self._inner.write(c.name + SCALES, joined.data.cast("B"))
            c.scales = []

    def fidelity(self) -> PackFidelity:
        """The error of what was written: ``||R_hat - R|| / ||R||`` per tensor and over
        all (vectors, kept in fp32, count with no error)."""
        err = sum(c.err2 for c in self._coding.values())
        ref = sum(c.ref2 for c in self._coding.values())
        return PackFidelity(
            format=self.fmt.name,
            bits=self.fmt.bits,
            group_size=self.fmt.group or None,
            scale=self.fmt.scale,
            coding=self.fmt.describe(),
            rel_error=math.sqrt(err / ref) if ref else 0.0,
            tensors={
                n: math.sqrt(c.err2 / c.ref2) if c.ref2 else 0.0 for n, c in self._coding.items()
            },
        )

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()


@dataclass(frozen=True)
class _Parts:
    """Where one coded residual tensor's parts lie."""

    codes: TensorInfo
    scales: TensorInfo
    rows: TensorInfo | None
    common: int
    cols: int


@dataclass
class LossyPack(Checkpoint):
    """A lossy pack read as a checkpoint of fp32 residual tensors (see module)."""

    fmt: LossyFormat | None = None
    _parts: dict[str, _Parts] = field(default_factory=dict, repr=False)

    @classmethod
    def open_lossy(
        cls,
        pack_dir: Path,
        config: dict[str, Any],
        stored: dict[str, TensorInfo],
        manifest: ResidualManifest,
        fmt: LossyFormat,
        verifier: Any,
    ) -> LossyPack:
        """The pack whose shard headers gave ``stored``, checked against ``manifest``.

        Raises:
            CorruptCheckpointError: a part is missing or of the wrong dtype or shape.
        """
        pack = cls(pack_dir, config, {}, verifier=verifier, fmt=fmt)
        for name, t in manifest.tensors.items():
            if not quantized(t.shape):
                pack.tensors[name] = _part(pack_dir, stored, name, F32, t.shape)
                continue
            rows, cols = rows_cols(t.shape)
            common = t.common_rows
            shape = (common, fmt.code_cols(cols))
            codes = _part(pack_dir, stored, name + CODES, fmt.code_dtype, shape)
            scales = _part(pack_dir, stored, name + SCALES, F32, (common, fmt.scale_cols(cols)))
            extra = None
            if rows > common:
                kept = stored.get(name + ROWS)
                dtype = rows_dtype(kept.dtype) if kept else F32
                extra = _part(pack_dir, stored, name + ROWS, dtype, (rows - common, *t.shape[1:]))
            if any(p.file != codes.file for p in (scales, extra) if p is not None):
                raise CorruptCheckpointError(
                    f"{pack_dir}: the parts of {name} lie in several shards — the pack was "
                    "not written by Realign; compute it again"
                )
            pack._parts[name] = _Parts(codes, scales, extra, common, cols)
            pack.tensors[name] = TensorInfo(
                name, codes.file, F32, t.shape, codes.offset, rows * cols * F32.itemsize
            )
        return pack

    def map_rows(self, info: TensorInfo, row0: int, row1: int) -> memoryview | None:
        if info.name in self._parts:
            return None  # decoded, never mapped
        return super().map_rows(info, row0, row1)

    def release_rows(self, info: TensorInfo, row0: int, row1: int) -> None:
        if info.name not in self._parts:
            super().release_rows(info, row0, row1)

    def read_into(self, info: TensorInfo, row0: int, row1: int, out: memoryview) -> None:
        p = self._parts.get(info.name)
        if p is None:
            super().read_into(info, row0, row1, out)
            return
        assert self.fmt is not None
        if not p.cols:
            return
        flat = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        x = np.frombuffer(flat, dtype=np.float32, count=(row1 - row0) * p.cols)
        x = x.reshape(row1 - row0, p.cols)
        upto = min(row1, p.common)
        if row0 < upto:
            codes = self._rows(p.codes, row0, upto)
            self.fmt.decode(codes, self._rows(p.scales, row0, upto), x[: upto - row0])
        start = max(row0, p.common)
        if start < row1 and p.rows is not None:
            kept = self._rows(p.rows, start - p.common, row1 - p.common)
            x[start - row0 :] = widen(kept, p.rows.dtype)

    def _rows(self, info: TensorInfo, row0: int, row1: int) -> np.ndarray:
        buf = np.empty((row1 - row0) * info.row_bytes, dtype=np.uint8)
        if buf.size:
            super().read_into(info, row0, row1, buf.data)
        return buf.view(NUMPY[info.dtype.code]).reshape(row1 - row0, -1)


def _part(
    pack_dir: Path,
    stored: dict[str, TensorInfo],
    name: str,
    dtype: DType,
    shape: tuple[int, ...],
) -> TensorInfo:
    info = stored.get(name)
    if info is None or info.dtype != dtype or info.shape != shape:
        found = f"{info.dtype.code} {info.shape}" if info else "nothing"
        raise CorruptCheckpointError(
            f"{pack_dir}: {name} should be {dtype.code} {shape}, the shards hold {found} — "
            "the pack is damaged or was written by another version; compute it again"
        )
    return info
