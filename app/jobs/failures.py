"""What any exception raised inside a job becomes on its record: a code and a message.

Typed errors keep their code and message. Disk full (``ENOSPC``/``EDQUOT``) becomes
``insufficient_storage`` naming the path and the space left; a read-only or
forbidden path ``output_not_writable``; anything else ``internal_error`` naming the
stage and the exception type only (its text may hold internals; the worker log has
the traceback).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from app.core.errors import RealignError
from app.jobs.models import JobError, JobResult, JobStage

INSUFFICIENT_STORAGE = "insufficient_storage"
_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _gb(n: int) -> str:
    return f"{n / 1024**3:.2f} GB" if n >= 1024**3 else f"{n / 1024**2:.1f} MB"


def free_space(path: Path) -> tuple[int, int] | None:
    """(free, total) bytes of the filesystem holding ``path`` (or its nearest parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return None
    return usage.free, usage.total


def _where(stage: JobStage | None) -> str:
    return f"stage '{stage.value}'" if stage is not None else "the job"


def _storage_error(exc: OSError, stage: JobStage | None, store: Path) -> JobError:
    path = Path(str(exc.filename)) if exc.filename else store
    space = free_space(path)
    numbers = (
        f"{_gb(space[0])} free of {_gb(space[1])} on that filesystem once the partial "
        "output was removed"
        if space
        else "free space unknown"
    )
    what = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on device"
    return JobError(
        code=INSUFFICIENT_STORAGE,
        message=f"{_where(stage)}: {what} writing to {path}; {numbers}; nothing was "
        "published — free space there (or lower REALIGN_STORE_BUDGET_GB) and submit "
        "the job again",
    )


def job_error(exc: BaseException, stage: JobStage | None, store: Path, job_id: str) -> JobError:
    """The record's error for ``exc`` raised at ``stage`` of job ``job_id``.

    Args:
        exc: what the job raised (cancellation is handled before this).
        stage: the job's stage when it raised.
        store: the store root, where a disk-full error without a file name happened.
        job_id: named in messages that point at the worker log.
    """
    if isinstance(exc, RealignError):
        return JobError(code=exc.code, message=exc.message)
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return _storage_error(exc, stage, store)
    if isinstance(exc, OSError) and exc.errno in _NOT_WRITABLE:
        where = f" {exc.filename}" if exc.filename else ""
        return JobError(
            code="output_not_writable",
            message=f"{_where(stage)}: cannot write{where} ({exc.strerror}); make the "
            "store writable for the worker and submit the job again",
        )
    if isinstance(exc, OSError):
        where = f" on {exc.filename}" if exc.filename else ""
        where += f" -> {exc.filename2}" if exc.filename2 else ""
        return JobError(
            code="internal_error",
            message=f"{_where(stage)} failed: {exc.__class__.__name__} "
            f"({exc.strerror or 'I/O error'}){where}; the worker log has the details "
            f"(job {job_id})",
        )
    return JobError(
        code="internal_error",
        message=f"{_where(stage)} failed with an unexpected {exc.__class__.__name__}; "
        f"the worker log has the traceback (job {job_id})",
    )


def partial_result(exc: BaseException) -> JobResult | None:
    """What a failed job still has to show, when the error carries it (a sweep whose
    alphas all missed the objective keeps every score, for its report)."""
    result = getattr(exc, "result", None)
    return result if isinstance(result, JobResult) else None


def drop_tracebacks(exc: BaseException | None) -> None:
    """Forget the frames of ``exc`` and its causes (they can hold open files)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def lost_message(deliveries: int) -> str:
    return (
        f"the merge was delivered {deliveries} times and its worker died each time "
        "(out of memory? killed?) — check worker logs and resources before resubmitting"
    )


def time_limit_message(limit_s: float) -> str:
    return (
        f"the job ran longer than REALIGN_JOB_TIME_LIMIT_S ({limit_s:g} s) and was stopped; "
        "no model of it is registered or served — raise the limit for models this large, "
        "or look for a stalled read (the store's disk, REALIGN_MAX_READ_MBPS, the network)"
    )
