"""Lazy, shard-by-shard access to Hugging Face safetensors checkpoints.

Only headers are parsed up front; tensor bytes are read on demand, row range by
row range, either straight into caller-owned buffers (``os.preadv``) or as
zero-copy views of the page cache (``mmap``) that are released after use, so
reading a 16 GB model never needs more memory than one chunk.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from app.core.errors import CorruptCheckpointError, ModelNotFoundError, UnsafeCheckpointError
from app.residuals.headers import TensorInfo, corrupt, header_of, read_header
from app.residuals.integrity import ReadVerifier

__all__ = [
    "INDEX_NAME",
    "PICKLE_SUFFIXES",
    "Checkpoint",
    "TensorInfo",
    "header_of",
    "read_config",
    "read_header",
    "weight_files",
]

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENODEV, errno.EOPNOTSUPP}
# Linux >= 5.14 (Python < 3.13 lacks the name); elsewhere pages fault in on first use.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else -1)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory, refusing pickle-only checkpoints.

    Raises:
        ModelNotFoundError: no weights at all.
        UnsafeCheckpointError: only pickled weights (``.bin``/``.pt``) are present.
    """
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise ModelNotFoundError(
                f"{index} lists {missing[0]} but it is not in {directory} — the download is "
                "incomplete; fetch the missing shards"
            )
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise UnsafeCheckpointError(
            f"{directory} has weights only as {', '.join(pickled)}: pickled checkpoints can run "
            "arbitrary code when loaded, so Realign reads safetensors only — convert them first "
            "(e.g. load with transformers and save_pretrained(..., safe_serialization=True))"
        )
    raise ModelNotFoundError(f"{directory} holds no *.safetensors weights")


@dataclass
class Checkpoint:
    """A model directory: its config and the headers of all its tensors.

    Use as a context manager; file descriptors are opened lazily and closed on exit.
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)
    _maps: dict[Path, tuple[mmap.mmap, memoryview]] = field(default_factory=dict, repr=False)
    verifier: ReadVerifier | None = field(default=None, repr=False)  # hashes what is read

    @classmethod
    def open(cls, path: Path) -> Checkpoint:
        """Read ``config.json`` and every shard header of the model at ``path``.

        Raises:
            ModelNotFoundError, UnsafeCheckpointError, CorruptCheckpointError.
        """
        config = read_config(path)
        return cls.from_headers(path, config, ((f, read_header(f)[0]) for f in weight_files(path)))

    @classmethod
    def from_headers(
        cls,
        path: Path,
        config: dict[str, Any],
        headers: Iterable[tuple[Path, dict[str, TensorInfo]]],
    ) -> Checkpoint:
        """The checkpoint at ``path`` from its config and the headers of its weight files
        (read there, or by ranges from files not downloaded yet: tensor data cannot be
        read from such a checkpoint, only planned with).

        Raises:
            CorruptCheckpointError: a tensor in two files, or the index disagrees.
        """
        tensors: dict[str, TensorInfo] = {}
        for file, found in headers:
            for name, info in found.items():
                if name in tensors:
                    raise CorruptCheckpointError(
                        f"{path}: tensor {name!r} is stored twice ({tensors[name].file.name} "
                        f"and {file.name})"
                    )
                tensors[name] = info
        _check_index(path, tensors)
        return cls(path, config, tensors)

    def read_into(self, info: TensorInfo, row0: int, row1: int, out: memoryview) -> None:
        """Read rows ``[row0, row1)`` of ``info`` into ``out`` (exactly that many bytes)."""
        fd = self._fd(info.file)
        offset = info.offset + row0 * info.row_bytes
        want = (row1 - row0) * info.row_bytes
        view = out[:want]
        done = 0
        while done < want:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise corrupt(info.file, f"unexpected end of file in {info.name!r}")
            done += got
        if self.verifier is not None:
            self.verifier.consume(info.file, offset, view)

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def map_rows(self, info: TensorInfo, row0: int, row1: int) -> memoryview | None:
        """Rows ``[row0, row1)`` of ``info`` as a view of the page cache, no copy.

        The pages are read in now, by the calling thread, and readahead of as many
        bytes again is started. The view is of a private mapping: writes to it
        never reach the file. Pair every call with :meth:`release_rows`.

        Returns:
            The view, or None where the file system cannot map files (use
            :meth:`read_into` then).

        Raises:
            CorruptCheckpointError: the file is shorter than its header says.
            OSError: the pages could not be read.
        """
        entry = self._maps.get(info.file)
        if entry is None:
            fd = self._fd(info.file)
            size = os.fstat(fd).st_size
            if size == 0:
                raise corrupt(info.file, "empty file")
            try:
                mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
            except OSError as exc:
                if exc.errno in _UNSUPPORTED:
                    return None
                raise
            entry = self._maps[info.file] = (mm, memoryview(mm))
        mm, view = entry
        start = info.offset + row0 * info.row_bytes
        end = start + (row1 - row0) * info.row_bytes
        if end > len(mm):
            raise corrupt(info.file, f"unexpected end of file in {info.name!r}")
        if end > start and _MADV_POPULATE_READ >= 0:
            ahead = min(len(mm), 2 * end - start)
            os.posix_fadvise(self._fds[info.file], start, ahead - start, os.POSIX_FADV_WILLNEED)
            try:
                _advise(mm, _MADV_POPULATE_READ, start, end)
            except OSError as exc:
                if exc.errno != errno.EFAULT:
                    raise
                raise corrupt(info.file, f"{info.name!r} lies past the end of file") from exc
        if self.verifier is not None:
            self.verifier.consume(info.file, start, view[start:end], stable=True)
        return view[start:end]

    def release_rows(self, info: TensorInfo, row0: int, row1: int) -> None:
        """Drop the pages of a :meth:`map_rows` view from this process (they stay
        in the page cache), so resident memory does not grow with the model."""
        entry = self._maps.get(info.file)
        if entry is not None:
            start = info.offset + row0 * info.row_bytes
            if self.verifier is not None:  # hashed first, else it would fault them back in
                self.verifier.wait_hashed(info.file, start + (row1 - row0) * info.row_bytes)
            _advise(entry[0], mmap.MADV_DONTNEED, start, start + (row1 - row0) * info.row_bytes)

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.close()  # no verdict after this; finish() comes before close
        for mm, view in self._maps.values():
            try:
                view.release()
                mm.close()
            except BufferError:  # a caller still holds a view: unmapped when it goes
                pass
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _advise(mm: mmap.mmap, advice: int, start: int, end: int) -> None:
    """``madvise`` over the pages that hold bytes ``[start, end)``. A kernel that
    lacks the advice only loses the optimisation; a read error is raised here, as
    an exception, rather than later as a SIGBUS in the math."""
    lo = start - start % mmap.PAGESIZE
    if end > lo:
        try:
            mm.madvise(advice, lo, end - lo)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise


def read_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` of the model directory ``path``.

    Raises:
        ModelNotFoundError: no directory, or no config in it.
        CorruptCheckpointError: the config is not a JSON object.
    """
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is not a directory with a model in it")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{path} has no config.json — not a Hugging Face model dir")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{config_path}: invalid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CorruptCheckpointError(
            f"{config_path}: expected a JSON object of model settings, found a "
            f"{type(config).__name__} — restore the model's config.json"
        )
    return config


def _check_index(path: Path, tensors: dict[str, TensorInfo]) -> None:
    index = path / INDEX_NAME
    if not index.is_file():
        return
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    for name, file in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != file:
            raise CorruptCheckpointError(
                f"{index}: {name!r} is mapped to {file} but that shard does not hold it"
            )
