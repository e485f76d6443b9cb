"""Child processes that end with their parent and take their own children with them.

A worker that runs an evaluation starts processes (the loopback engine, the lm-eval
child) and may itself be SIGKILLed (out of memory, a node drained): nothing of its own
clean-up runs then, yet its job is redelivered and starts them again. vLLM's engine
core and its worker outlive a killed parent, so :func:`spawn` ties a child on Linux:

- the child gets SIGKILL when the thread that started it ends, however it ends
  (``PR_SET_PDEATHSIG``; a parent gone before the tie is made is seen in ``getppid()``,
  so no window is left);
- the child leads a process group of its own, with a small watcher in it that SIGKILLs
  the whole group once the child is gone: what the child started goes with it, however
  the child ended.

A prelude makes the ties, ``python -m app.core.lifeline PARENT -- COMMAND...``, then
``exec``s the command (``preexec_fn`` is unsafe in a process with threads, as every
worker is). Elsewhere (macOS) the child still leads its own group and :func:`kill` /
:func:`stop` end the whole group; a parent killed outright leaves it running there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

LINUX = sys.platform.startswith("linux")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The watcher's signal: blocked and waited for, so a stray one (a SIGTERM to the whole
# group) is absorbed; only the leader's death makes the watcher act.
WATCH_SIGNAL = signal.SIGTERM


def spawn(command: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
    """Start ``command`` as ``subprocess.Popen(command, **popen)`` does, in a process group
    of its own, tied to the calling thread (see the module's docstring): call it from a
    thread that outlives the child, as one that waits for it or closes it does.

    Returns:
        The child; its pid is the group's id.
    """
    argv = [*command]
    if LINUX:
        argv = [sys.executable, "-m", "app.core.lifeline", str(os.getpid()), "--", *argv]
    return subprocess.Popen(argv, process_group=0, **popen)


def kill(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the child and what is left of its process group (what it started)."""
    proc.kill()  # a no-op once it was waited for
    # A group id is not given to a new process while any member of the group lives, so
    # this reaches only the child's own processes (or nothing: the group is gone).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def stop(proc: subprocess.Popen[Any], grace: float) -> None:
    """End the child: SIGTERM and ``grace`` seconds to shut down (its own clean-up), then
    SIGKILL to it and to what is left of its group; returns once it has exited."""
    if grace > 0 and proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    kill(proc)
    proc.wait()


def _tie(parent: int, sig: int) -> bool:
    """Ask the kernel for ``sig`` when the parent thread ends; False if the parent was
    gone already (before the request, when no signal would come)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    return os.getppid() == parent


def _start_watcher() -> None:
    """Fork the group's watcher: it waits until this process (the group's leader, soon the
    command) is gone, then SIGKILLs the group, itself included."""
    leader = os.getpid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {WATCH_SIGNAL})  # none lost before sigwait
    if os.fork():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {WATCH_SIGNAL})  # masks outlive exec
        return
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # hold none of the leader's pipes open
            os.dup2(null, fd)
        alive = _tie(leader, WATCH_SIGNAL)
        # The signal also comes when only the leader's thread that forked the watcher
        # ends (another of the leader's threads becomes its parent), or from a stray
        # kill: wait on while the leader lives.
        while alive and os.getppid() == leader:
            signal.sigwait({WATCH_SIGNAL})
        os.killpg(leader, signal.SIGKILL)
    finally:  # never back into the prelude, whatever failed: it would run the command
        os._exit(0)


def main(argv: list[str]) -> NoReturn:
    """``python -m app.core.lifeline PARENT -- COMMAND...``: tie this process to PARENT,
    start the group's watcher, become COMMAND."""
    parent, sep, *command = argv
    if sep != "--" or not command:
        raise SystemExit("usage: python -m app.core.lifeline PARENT -- COMMAND...")
    if not _tie(int(parent), signal.SIGKILL):
        raise SystemExit(f"lifeline: parent {parent} ended before {command[0]} started")
    if os.getpgrp() == os.getpid():  # a group of its own to sweep (spawn makes one)
        _start_watcher()
    # Python starts with SIGPIPE and SIGXFSZ ignored, and exec keeps ignored signals:
    # the command gets the defaults, as subprocess's restore_signals gives.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"lifeline: cannot start {command[0]}: {exc}", file=sys.stderr)
        os._exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
