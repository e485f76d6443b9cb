"""Atomic publication of directories: write under a hidden temp name, fsync,
rename. A reader never sees a half-written model or residual pack."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from app.core.errors import OutputExistsError, OutputNotWritableError

PARTIAL = ".partial-"


def check_output(dest: Path, *, overwrite: bool = False) -> None:
    """Fail fast, before heavy work, when ``dest`` cannot be published.

    Raises:
        OutputExistsError: ``dest`` exists and ``overwrite`` is off.
        OutputNotWritableError: the parent directory cannot be written.
    """
    if dest.exists() and not overwrite:
        raise OutputExistsError(
            f"{dest} already exists; choose a new --out or pass --overwrite to replace it"
        )
    probe = dest.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputNotWritableError(f"cannot write {dest}: {probe} is not a directory")
    try:  # permission bits do not tell the whole story (read-only mounts, root)
        tempfile.TemporaryDirectory(dir=probe, prefix=".realign-probe-").cleanup()
    except OSError as exc:
        raise OutputNotWritableError(
            f"cannot write {dest}: {probe} is not writable ({exc.strerror})"
        ) from exc


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staging_dir(dest: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory beside ``dest``; on success publish it as ``dest``.

    On any exception (cancellation included) the temp directory is removed and
    ``dest`` is left as it was.
    """
    check_output(dest, overwrite=overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}{PARTIAL}{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise OutputNotWritableError(f"cannot create {tmp}: {exc.strerror}") from exc
    try:
        yield tmp
        publish(tmp, dest, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, dest: Path, *, overwrite: bool = False) -> None:
    """fsync ``tmp`` and rename it to ``dest`` (replacing it only when ``overwrite``)."""
    _fsync_tree(tmp)
    if dest.exists():
        if not overwrite:
            raise OutputExistsError(f"{dest} appeared while writing; the new copy was discarded")
        trash = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(dest, trash)
        os.replace(tmp, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    _fsync_dir(dest.parent)
