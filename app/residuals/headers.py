"""Safetensors headers: where each tensor of a file lives and what it is, parsed and
checked without reading tensor data, from a local file or by byte ranges from one
not downloaded yet."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.errors import CorruptCheckpointError
from app.residuals.dtypes import DTYPES, DType

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives on disk and what it is."""

    name: str
    file: Path
    dtype: DType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


def corrupt(path: Path, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: {what} — the file is truncated or not a safetensors file; "
        "re-download or re-export it"
    )


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        The tensors by name and the ``__metadata__`` mapping.

    Raises:
        CorruptCheckpointError: the header is malformed or points past the file end.
    """
    with path.open("rb") as fh:
        fd = fh.fileno()
        return header_of(path, os.fstat(fd).st_size, lambda at, n: os.pread(fd, n, at))


def header_of(
    path: Path, size: int, read: Callable[[int, int], bytes]
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """:func:`read_header` of a file read through ``read(offset, length)``: a local one,
    or one not downloaded yet, read by byte ranges (``path`` is where it will be).

    Args:
        path: the file (named in errors and in each ``TensorInfo``).
        size: its size in bytes.
        read: the ``length`` bytes at ``offset`` (fewer at the end of the file).
    """
    head = read(0, 8)
    if len(head) < 8:
        raise corrupt(path, f"only {size} bytes")
    (hlen,) = struct.unpack("<Q", head)
    if hlen > min(_MAX_HEADER, size - 8):
        raise corrupt(path, f"header length {hlen} exceeds the file ({size} bytes)")
    try:
        raw: dict[str, Any] = json.loads(read(8, hlen))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(path, f"header is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise corrupt(path, "header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    base = 8 + hlen
    tensors = {name: _tensor_info(path, name, entry, base, size) for name, entry in raw.items()}
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _tensor_info(path: Path, name: str, entry: Any, base: int, size: int) -> TensorInfo:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise corrupt(path, f"tensor {name!r} has a malformed header entry ({exc!r})") from exc
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes or begin < 0:
        raise corrupt(path, f"tensor {name!r}: offsets {begin}..{end} do not hold {shape}")
    if base + end > size:
        raise corrupt(path, f"tensor {name!r} ends at byte {base + end} of {size}")
    return TensorInfo(name, path, dtype, shape, base + begin, nbytes)
