"""Measuring pieces of the benchmark: one timed child process, disk bandwidths.

Every command runs as a fresh child process; ``os.wait4`` gives that child's own
peak RSS and CPU time. The CPU that *other* processes used during the run is read
from ``/proc/stat``, because the benchmark machine may be shared.
"""

from __future__ import annotations

import mmap
import os
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

BLOCK = 8 * 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Run:
    """One measured child process."""

    wall: float
    rss_mb: float  # peak resident set of the child (ru_maxrss)
    cpu: float  # user + system seconds of the child
    others: float  # cores used by other processes during the run, on average


def _busy_ticks() -> int:
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait


def other_load(seconds: float = 1.0) -> float:
    """Cores busy over ``seconds`` while this process sleeps: other processes' load."""
    busy0 = _busy_ticks()
    time.sleep(seconds)
    return (_busy_ticks() - busy0) / TICK / seconds


def wait_quiet(limit: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until other processes use under ``limit`` cores;
    return the load last seen."""
    deadline = time.monotonic() + max_wait
    load = other_load()
    while load > limit and time.monotonic() < deadline:
        load = other_load(2.0)
    return load


def run(cmd: Sequence[str | Path], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` to completion; stdout and stderr go to ``log``.

    Raises:
        RuntimeError: the command failed (the log's tail is in the message).
    """
    busy0 = _busy_ticks()
    t0 = time.perf_counter()
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    busy = (_busy_ticks() - busy0) / TICK
    cpu = usage.ru_utime + usage.ru_stime
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{tail}")
    return Run(wall, usage.ru_maxrss / 1024, cpu, max(0.0, busy - cpu) / wall)


def drop_caches() -> bool:
    """Empty the page cache (needs root); False where that is not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def read_files(files: Iterable[Path]) -> tuple[int, float]:
    """Read files sequentially; return (bytes, seconds)."""
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for f in files:
        with f.open("rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total, time.perf_counter() - t0


def write_file(path: Path, nbytes: int, direct: bool) -> float:
    """Write ``nbytes`` of random data durably (fsync), with O_DIRECT or through
    the page cache; return seconds. The file is removed after."""
    block = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    block.write(os.urandom(BLOCK))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    t0 = time.perf_counter()
    fd = os.open(path, flags, 0o644)
    try:
        for _ in range(-(-nbytes // BLOCK)):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def sync_tree(path: Path) -> float:
    """fsync every file under ``path`` (tools that do not); return seconds."""
    t0 = time.perf_counter()
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return time.perf_counter() - t0


def safetensors_files(*dirs: Path) -> list[Path]:
    return [f for d in dirs for f in sorted(d.glob("*.safetensors"))]


def size_of(files: Iterable[Path]) -> int:
    return sum(f.stat().st_size for f in files)


@dataclass
class Series:
    """Repeated measurements of one thing."""

    runs: list[Run]

    @property
    def walls(self) -> list[float]:
        return [r.wall for r in self.runs]

    @property
    def median(self) -> float:
        return statistics.median(self.walls)

    @property
    def rss_mb(self) -> float:
        return max(r.rss_mb for r in self.runs)

    @property
    def others(self) -> float:
        return statistics.median(r.others for r in self.runs)
