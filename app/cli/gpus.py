"""``realign worker --gpus 0,1``: one worker process per GPU, each seeing only its own."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from app.core import lifeline
from app.core.errors import DeviceUnavailableError
from app.residuals.devices import check_device


def parse_gpus(spec: str) -> list[int]:
    """The GPU indices of ``--gpus`` (``0,1``), each checked to exist on this machine.

    Raises:
        DeviceUnavailableError: not a list of indices, a repeated index, no CUDA, or an
            index past the last GPU.
    """
    parts = [p.strip() for p in spec.split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise DeviceUnavailableError(
            f"--gpus {spec!r}: give GPU indices separated by commas, e.g. --gpus 0,1"
        )
    gpus = [int(p) for p in parts]
    if len(set(gpus)) != len(gpus):
        raise DeviceUnavailableError(f"--gpus {spec!r} names a GPU twice; one worker per GPU")
    for gpu in gpus:
        check_device(f"cuda:{gpu}")
    return gpus


def run_per_gpu(gpus: list[int], queues: str, name: str) -> int:
    """Start ``realign worker`` once per GPU (``CUDA_VISIBLE_DEVICES=<gpu>``,
    ``REALIGN_DEVICE=cuda``, name ``<name>`` with ``-gpu<N>`` before its ``@``) and wait
    for all of them; SIGTERM and SIGINT are passed on to every one.

    Returns:
        The highest exit status of the workers.
    """
    procs = []
    for gpu in gpus:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu), "REALIGN_DEVICE": "cuda"}
        node, at, host = name.partition("@")
        argv = ["-m", "app.cli", "worker", "-Q", queues, "-n", f"{node}-gpu{gpu}{at}{host}"]
        # Tied to this process: a supervisor killed outright takes its workers with it
        # (their jobs are redelivered), none is left holding a GPU.
        procs.append(lifeline.spawn([sys.executable, *argv], env=env))

    def forward(signum: int, _frame: FrameType | None) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return max(p.wait() for p in procs)
