"""A child started through :mod:`app.core.lifeline` ends with its parent, a SIGKILLed one
included, and takes what it started with it (as the engine child takes vLLM's engine
core); a child that ends alone takes its own children too. Real processes, real
SIGKILL: the child starts a grandchild with a plain ``subprocess.Popen``, untied, as
vLLM does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import psutil
import pytest

from app.core import lifeline

ROOT = Path(__file__).resolve().parents[2]
CHILD = (
    "import subprocess, sys, time\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print('grandchild', g.pid, flush=True)\n"
    "time.sleep(600)\n"
)
PARENT = (
    "import sys, time\n"
    "from app.core import lifeline\n"
    f"child = lifeline.spawn([sys.executable, '-c', {CHILD!r}])\n"
    "print('child', child.pid, flush=True)\n"
    "time.sleep(600)\n"
)
linux_only = pytest.mark.skipif(not lifeline.LINUX, reason="PR_SET_PDEATHSIG is Linux's")


def gone(p: psutil.Process) -> bool:
    """Whether ``p`` has ended (a zombie holds nothing but its pid: ended)."""
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def describe(procs: Iterable[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {p.name()} {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            out.append(f"{p.pid} (gone meanwhile)")
    return out


def wait_gone(procs: Iterable[psutil.Process], timeout: float) -> None:
    """Until every one of ``procs`` has ended; fails naming the survivors."""
    procs = list(procs)
    end = time.monotonic() + timeout
    while left := [p for p in procs if not gone(p)]:
        assert time.monotonic() < end, f"still running after {timeout} s: {describe(left)}"
        time.sleep(0.05)


@pytest.fixture
def family() -> Iterator[tuple[subprocess.Popen[str], dict[str, psutil.Process]]]:
    """A parent process that started a child through the lifeline, and the child a
    grandchild: the parent, and each process by role (child, grandchild, watcher)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    procs: dict[str, psutil.Process] = {}
    try:
        for _ in range(2):
            role, pid = parent.stdout.readline().split()
            procs[role] = psutil.Process(int(pid))
        if lifeline.LINUX:
            (procs["watcher"],) = (
                p for p in procs["child"].children() if p.pid != procs["grandchild"].pid
            )
        yield parent, procs
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        for p in procs.values():
            if not gone(p):
                p.kill()


@linux_only
def test_a_sigkilled_parent_takes_the_child_and_its_children(
    family: tuple[subprocess.Popen[str], dict[str, psutil.Process]],
) -> None:
    parent, procs = family
    child, grandchild = procs["child"], procs["grandchild"]
    # The prelude became the command; the child leads a group its grandchild is in.
    assert child.ppid() == parent.pid and child.cmdline()[1:3] == ["-c", CHILD]
    assert os.getpgid(child.pid) == child.pid == os.getpgid(grandchild.pid)
    time.sleep(0.3)
    assert not any(gone(p) for p in procs.values())  # tied, not killed early
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    wait_gone(procs.values(), timeout=10)


@linux_only
def test_a_child_that_ends_alone_takes_its_children(
    family: tuple[subprocess.Popen[str], dict[str, psutil.Process]],
) -> None:
    """The engine child killed (out of memory, say) while its parent lives: the engine
    core it started goes too."""
    parent, procs = family
    procs["child"].send_signal(signal.SIGKILL)
    wait_gone(procs.values(), timeout=10)
    assert parent.poll() is None


@linux_only
def test_no_command_starts_once_the_parent_is_gone() -> None:
    """The prelude finds its parent is not the one that asked (it ended before the tie
    was made, when the kernel would send nothing): the command never starts."""
    command = [sys.executable, "-c", "print('started')"]
    done = subprocess.run(
        [sys.executable, "-m", "app.core.lifeline", "1", "--", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and done.stdout == ""
    assert "parent 1 ended before" in done.stderr


def test_stop_ends_the_child_and_its_group(tmp_path: Path) -> None:
    child = lifeline.spawn(
        [sys.executable, "-c", CHILD], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    with child.stdout:
        grandchild = psutil.Process(int(child.stdout.readline().split()[1]))
        lifeline.stop(child, grace=5)
    assert child.returncode == -signal.SIGTERM
    wait_gone([grandchild], timeout=10)
