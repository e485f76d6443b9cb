"""The worker's container probe (k8s/base/worker.yaml): a real `celery worker` touches
REALIGN_WORKER_ALIVE_FILE on every heartbeat, also while Redis is down, and the probe
command of the manifest passes on a fresh file and fails on a stale one."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from app.demo.tiny import TinyTriple
from app.jobs.dispatch import HEARTBEAT_S
from tests.jobs.conftest import ROOT, RedisServer, Workers, service_env

pytestmark = pytest.mark.slow
MANIFEST_PATH = "/tmp/realign-worker.alive"


def probe_command(alive: Path) -> list[str]:
    """The liveness probe of the worker Deployment, pointed at ``alive``."""
    (dep,) = yaml.safe_load_all((ROOT / "k8s" / "base" / "worker.yaml").read_text())
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["REALIGN_WORKER_ALIVE_FILE"] == MANIFEST_PATH
    return [
        part.replace(MANIFEST_PATH, str(alive)) for part in c["livenessProbe"]["exec"]["command"]
    ]


@pytest.fixture
def workers(
    redis_server: RedisServer, llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> Iterator[Workers]:
    env = service_env(
        redis_server.url,
        store_dir,
        [llama_triple.base.parent],
        REALIGN_WORKER_ALIVE_FILE=str(tmp_path / "probe" / "worker.alive"),
    )
    pool = Workers(env, tmp_path)
    yield pool
    pool.stop_all()


def wait_touched(alive: Path, after: float, timeout: float, workers: Workers) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if alive.exists() and alive.stat().st_mtime > after:
            return alive.stat().st_mtime
        time.sleep(0.2)
    raise AssertionError(f"{alive} not touched in {timeout} s\n{workers.logs()}")


def test_heartbeat_file_outlives_a_redis_restart(
    workers: Workers, redis_server: RedisServer, tmp_path: Path
) -> None:
    alive = tmp_path / "probe" / "worker.alive"
    workers.start("probe")
    first = wait_touched(alive, 0.0, 60, workers)
    probe = probe_command(alive)
    assert subprocess.run(probe).returncode == 0

    redis_server.stop()  # the broker and the records vanish: the worker must stay live
    try:
        wait_touched(alive, first, HEARTBEAT_S * 2 + 5, workers)
        assert subprocess.run(probe).returncode == 0
    finally:
        redis_server.start()

    stale = time.time() - 600  # a worker whose beat stopped ten minutes ago
    os.utime(alive, (stale, stale))
    workers.stop_all()
    assert subprocess.run(probe).returncode != 0
