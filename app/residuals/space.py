"""Free space: checked before writing, and a full disk mid-write reported as such.

Before a residual pack or a merged model is written, its expected size (from the
safetensors headers alone) plus :data:`HEADROOM` is compared with the free space
of every file system it goes to. A disk that fills anyway (another writer, a
quota) surfaces as :class:`InsufficientStorageError` naming the file, the bytes
still to write and the bytes free — never as a bare ``OSError`` without a path.
"""

from __future__ import annotations

import errno
import functools
import inspect
import math
import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from app.core.errors import InsufficientStorageError
from app.residuals.assets import asset_files
from app.residuals.checkpoint import Checkpoint
from app.residuals.compat import weight_tensors
from app.residuals.dtypes import DType

HEADROOM = 1.10  # expected bytes + 10 %: headers, configs, manifests, file system overhead
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_PER_TENSOR = 256  # safetensors header and index entry, generously
_PER_OUTPUT = 64 * 1024  # config, manifest, model card
ADVICE = (
    "free space there (`realign rm <key>` deletes stored artifacts), set "
    "REALIGN_STORE_BUDGET_GB so the store evicts least recently used ones, or choose "
    "another --out"
)
_ADVICE_BY_ERRNO = {
    errno.EDQUOT: "raise the disk quota, free space under it, or choose another --out",
    errno.EFBIG: "the file exceeds the file size limit (ulimit -f) or the file system's "
    "largest file — raise the limit or lower REALIGN_MAX_SHARD_GB",
}
F = TypeVar("F", bound=Callable[..., Any])


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``path``
    (its nearest existing ancestor when ``path`` does not exist yet)."""
    st = os.statvfs(_existing(path))
    return st.f_bavail * st.f_frsize


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB ({n} bytes)" if n < 10**9 else f"{n / 1e9:.2f} GB ({n} bytes)"


def ensure_space(needs: Iterable[tuple[Path, int]]) -> None:
    """Check that each file system can take what goes to it, plus :data:`HEADROOM`.

    Args:
        needs: (destination path, expected bytes) pairs; destinations on one file
            system are added up.

    Raises:
        InsufficientStorageError: a file system has less free space than needed.
    """
    by_fs: dict[int, tuple[list[Path], int]] = {}
    for path, nbytes in needs:
        dev = os.stat(_existing(path)).st_dev
        paths, total = by_fs.get(dev, ([], 0))
        by_fs[dev] = ([*paths, path], total + nbytes)
    for paths, total in by_fs.values():
        needed, free = math.ceil(total * HEADROOM), free_bytes(paths[0])
        if needed > free:
            where = " and ".join(str(p) for p in paths)
            raise InsufficientStorageError(
                f"not enough free space to write {where}: needs {_size(needed)} "
                f"(expected output + 10 %), {_size(free)} free — {ADVICE}",
                path=str(paths[0]),
                needed=needed,
                free=free,
            )


def residual_bytes(instruct: Checkpoint, dtype: DType) -> int:
    """Expected size of the residual pack of ``instruct`` (one element per float
    weight of the instruct side, in ``dtype``) with its assets."""
    tensors = [t for t in weight_tensors(instruct).values() if t.is_float]
    # An exact pack keeps each tensor's own dtype (and codes it smaller): bound by that.
    data = sum(
        math.prod(t.shape) * (t.dtype.itemsize if dtype.code == "EXACT" else dtype.itemsize)
        + _PER_TENSOR
        for t in tensors
    )
    return data + _assets(instruct.path) + _PER_OUTPUT


def merged_bytes(target: Checkpoint, wider: Checkpoint, assets_from: Path) -> int:
    """Expected size of a merged model: the target's weights in the target's dtype,
    vocabulary tensors grown to the rows of ``wider`` (the instruct side or a residual
    pack), and the assets of ``assets_from``."""
    total = _PER_OUTPUT + _assets(assets_from)
    for name, t in weight_tensors(target).items():
        rows, other = t.rows, wider.tensors.get(name)
        if other is not None and other.shape[1:] == t.shape[1:] and other.rows > rows:
            rows = other.rows
        total += t.row_bytes * rows + _PER_TENSOR
    return total


def _assets(directory: Path) -> int:
    return sum(f.stat().st_size for f in asset_files(directory)) if directory.is_dir() else 0


def disk_full_error(
    path: Path | str | None, exc: BaseException, needed: int | None = None
) -> InsufficientStorageError:
    """The typed error for a write to ``path`` that failed with a full disk."""
    code = getattr(exc, "errno", None)
    reason = os.strerror(code) if isinstance(code, int) else str(exc)
    where = Path(path) if path is not None else None
    free = free_bytes(where) if where is not None else None
    numbers = [f"{_size(needed)} still to write"] if needed is not None else []
    if free is not None:
        numbers.append(f"{_size(free)} free")
    detail = f" ({', '.join(numbers)})" if numbers else ""
    target = f"writing {where}" if where is not None else "writing the output"
    advice = _ADVICE_BY_ERRNO.get(code, ADVICE) if isinstance(code, int) else ADVICE
    return InsufficientStorageError(
        f"{reason} while {target}{detail}; nothing was published — {advice}",
        path=str(where) if where is not None else None,
        needed=needed,
        free=free,
        err=code if isinstance(code, int) else None,
    )


def is_disk_full(exc: BaseException) -> bool:
    """An OSError of a full disk or quota, or SQLite's "database or disk is full"."""
    if isinstance(exc, InsufficientStorageError):
        return False  # already typed
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL
    return isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc)


def reports_disk_full(
    *path_params: str, fallback: Callable[[], Path] | None = None
) -> Callable[[F], F]:
    """Decorate an engine verb so a full disk anywhere inside it raises
    :class:`InsufficientStorageError`, naming the file when the OS said which one,
    else the fullest of the ``path_params`` (argument names; ``fallback()`` stands
    for one given as None, e.g. the configured store)."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                given = signature.bind(*args, **kwargs)
                given.apply_defaults()
                path = getattr(exc, "filename", None) or _fullest(
                    given.arguments, path_params, fallback
                )
                raise disk_full_error(path, exc) from exc

        return wrapper  # type: ignore[return-value]

    return wrap


def _fullest(
    given: dict[str, Any], names: tuple[str, ...], fallback: Callable[[], Path] | None
) -> Path | None:
    paths = []
    for name in names:
        value = getattr(given.get(name), "root", given.get(name))  # a LocalStore: its root
        if isinstance(value, str | Path):
            paths.append(Path(value))
        elif value is None and fallback is not None:
            paths.append(fallback())
    return min(paths, key=free_bytes) if paths else None
