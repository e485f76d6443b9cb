"""The quarantine of a store directory: corrupt artifacts moved aside (kept for
inspection, never deleted) and a log that counts them."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path

QUARANTINE = ".quarantine"
_LOG = "quarantine.log"


def quarantine_dir(
    where: Path, src: Path, key: str, kind: str, reason: str, *, log: bool = True
) -> Path | None:
    """Move directory ``src`` (a corrupt copy of ``key``) to ``where/<key>.<time>``;
    None when it is gone (another process moved it). ``log`` counts it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = where / f"{key}.{stamp}.{uuid.uuid4().hex[:6]}"
    try:
        os.replace(src, dest)
    except FileNotFoundError:
        return None
    if log:
        log_quarantine(where, key, kind, str(dest), reason)
    return dest


def log_quarantine(where: Path, key: str, kind: str, path: str, reason: str) -> None:
    """Count one quarantined artifact (``path``: where it went) in the log."""
    line = {"time": time.time(), "key": key, "kind": kind, "path": path, "reason": reason}
    with (where / _LOG).open("a") as fh:
        fh.write(json.dumps(line) + "\n")


def quarantine_count(where: Path) -> int:
    """How many artifacts were ever quarantined here (a counter)."""
    with contextlib.suppress(FileNotFoundError), (where / _LOG).open() as fh:
        return sum(1 for _ in fh)
    return 0
