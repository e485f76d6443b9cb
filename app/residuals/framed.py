"""Exact residual packs on disk: ``residual-NNNNN.frames`` files and their index.

:class:`app.residuals.framewriter.FramedWriter` writes them: each residual tensor's
``(p, neg)`` cut into frames (:mod:`app.residuals.frames`), appended in order;
``residual.frames.json`` maps each tensor to its file and frame offsets.

:class:`FramedPack` reads such a pack as a :class:`Checkpoint` holding, for each residual
tensor ``name``, two tensors: ``name`` (``p``) and ``name::neg``, so every reader of packs
plans with them as with any checkpoint; frames are decoded as rows are asked for, read
through the pack's read verifier (each file checked against its recorded checksum).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.errors import ArtifactCorruptError, CorruptCheckpointError
from app.residuals.checkpoint import Checkpoint, TensorInfo
from app.residuals.dtypes import DTYPES, DType
from app.residuals.frames import FRAME_ELEMS, FrameError, decode_frame
from app.residuals.integrity import mismatch_message

FRAMES_INDEX = "residual.frames.json"
FRAMES_FORMAT = "realign.frames/1"
NEG = "::neg"
"""Suffix of the correction tensor of each residual tensor in a :class:`FramedPack`."""


def frame_file(i: int) -> str:
    return f"residual-{i + 1:05d}.frames"


@dataclass(frozen=True)
class _Framed:
    """One residual tensor of a framed pack: where its frames lie."""

    name: str
    file: Path
    dtype: DType
    shape: tuple[int, ...]
    offsets: tuple[int, ...]  # frame k is bytes [offsets[k], offsets[k + 1]) of ``file``

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def elems(self) -> int:
        return math.prod(self.shape)


def _read_index(pack_dir: Path) -> dict[str, _Framed]:
    path = pack_dir / FRAMES_INDEX
    try:
        index = json.loads(path.read_text())
        if index.get("format") != FRAMES_FORMAT or index["frame_elems"] != FRAME_ELEMS:
            raise ValueError(f"format {index.get('format')!r}, {index.get('frame_elems')} elems")
        out = {}
        for name, e in index["tensors"].items():
            dtype = DTYPES[e["dtype"]]
            elems = math.prod(e["shape"])
            offsets = tuple(int(o) for o in e["frames"])
            if len(offsets) != -(-elems // FRAME_ELEMS) + 1:
                raise ValueError(f"{name}: {len(offsets) - 1} frames for {elems} elements")
            out[name] = _Framed(name, pack_dir / e["file"], dtype, tuple(e["shape"]), offsets)
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(
            f"{path}: not a readable frames index ({exc.__class__.__name__}: {exc})"
        ) from exc


def _infos(pack_dir: Path, framed: dict[str, _Framed]) -> list[TensorInfo]:
    infos = []
    for name, f in framed.items():
        for logical in (name, name + NEG):
            infos.append(TensorInfo(logical, f.file, f.dtype, f.shape, 0, f.elems * f.itemsize))
    return infos


@dataclass
class FramedPack(Checkpoint):
    """An exact pack read as a checkpoint of ``name`` / ``name::neg`` tensors (see module).

    ``map_rows`` gives None (frames are decoded, never mapped); ``read_into`` decodes the
    frames a row range covers, keeping the last few decoded so that reading ``name`` then
    ``name::neg`` of the same rows decodes once.
    """

    label: str = ""
    _framed: dict[str, _Framed] = field(default_factory=dict, repr=False)
    _cache: OrderedDict[tuple[str, int], tuple[bytearray, bytearray]] = field(
        default_factory=OrderedDict, repr=False
    )
    _free: list[tuple[bytearray, bytearray]] = field(default_factory=list, repr=False)
    _raw: bytearray = field(default_factory=bytearray, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open_framed(
        cls, pack_dir: Path, config: dict[str, Any], label: str, verifier: Any
    ) -> FramedPack:
        framed = _read_index(pack_dir)
        tensors = {i.name: i for i in _infos(pack_dir, framed)}
        pack = cls(pack_dir, config, tensors, verifier=verifier, label=label)
        pack._framed = framed
        return pack

    def map_rows(self, info: TensorInfo, row0: int, row1: int) -> memoryview | None:
        return None

    def release_rows(self, info: TensorInfo, row0: int, row1: int) -> None:
        return None

    def read_into(self, info: TensorInfo, row0: int, row1: int, out: memoryview) -> None:
        neg = info.name.endswith(NEG)
        f = self._framed[info.name[: -len(NEG)] if neg else info.name]
        row_elems = f.elems // info.rows if info.rows else 0
        lo, hi = row0 * row_elems, row1 * row_elems
        out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        at = 0
        with self._lock:
            for k in range(lo // FRAME_ELEMS, -(-hi // FRAME_ELEMS)):
                start = k * FRAME_ELEMS
                p, n = self._frame(f, k)
                data = n if neg else p
                a, b = max(lo, start) - start, min(hi, start + FRAME_ELEMS) - start
                size = (b - a) * f.itemsize
                out[at : at + size] = memoryview(data)[a * f.itemsize : b * f.itemsize]
                at += size

    def _frame(self, f: _Framed, k: int) -> tuple[bytearray, bytearray]:
        """Frame ``k`` of ``f`` decoded (from the cache when there); the caller holds the
        lock (buffers of evicted frames are reused: no allocation, no page faults, per
        frame)."""
        key = (f.name, k)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        n = min(FRAME_ELEMS, f.elems - k * FRAME_ELEMS)
        start, end = f.offsets[k], f.offsets[k + 1]
        if len(self._raw) < end - start:
            self._raw = bytearray(end - start)
        view = memoryview(self._raw)[: end - start]
        fd = self._fd(f.file)
        got = 0
        while got < view.nbytes:
            r = os.preadv(fd, [view[got:]], start + got)
            if r == 0:
                raise self._damaged(f, "the file ends inside a frame")
            got += r
        if self.verifier is not None:
            self.verifier.consume(f.file, start, view)
        size = FRAME_ELEMS * 4
        p, neg = self._free.pop() if self._free else (bytearray(size), bytearray(size))
        try:
            decode_frame(
                view,
                n,
                f.itemsize,
                memoryview(p)[: n * f.itemsize],
                memoryview(neg)[: n * f.itemsize],
            )
        except FrameError as exc:
            self._free.append((p, neg))
            if self.verifier is not None:  # a damaged file: say so as every reader does
                self.verifier.finish()
            raise self._damaged(f, f"frame {k} of {f.name!r}: {exc}") from exc
        self._cache[key] = (p, neg)
        while len(self._cache) > _CACHED_FRAMES:
            self._free.append(self._cache.popitem(last=False)[1])
        return p, neg

    def _damaged(self, f: _Framed, what: str) -> ArtifactCorruptError:
        return ArtifactCorruptError(
            f"{mismatch_message(self.label or str(self.path), f.file.name)} ({what})",
            file=f.file.name,
        )

    def close(self) -> None:
        self._cache.clear()
        self._free.clear()
        super().close()


_CACHED_FRAMES = 12  # a chunk's frames (8M elements = 8 frames) and its neighbours
