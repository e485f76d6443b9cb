"""Issue 9, point 4: the job plane and the serving plane as separate processes.

Real processes on loopback sharing one Redis and one store: `realign serve --role api`,
a `realign worker`, and `realign serve --role serving` replicas on their own ports. A
``serve: true`` merge is announced to every replica (Redis pub/sub, and the records for
replicas that start later), each loads it from the store and reports, and the job ends
from the reports — no process polls a queue to end it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.demo.tiny import TinyTriple
from tests.api.live import merge_body
from tests.jobs.conftest import ROOT, RedisServer, free_port, redis_server, service_env  # noqa: F401

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of the country?"}]
LOAD_TIMEOUT_S = 60  # REALIGN_SERVE_LOAD_TIMEOUT_S of the worker (the judge)


@dataclass
class Planes:
    """`realign` processes started with one environment, their logs kept."""

    env: dict[str, str]
    logdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"{name}.log").open("ab")
        cmd = [sys.executable, "-m", "app.cli", *args]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def serve(self, name: str, role: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        proc = self.start(name, "serve", "--role", role, "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, self.logs()
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{name} did not start\n{self.logs()}"
            time.sleep(0.2)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # a paused one must be able to exit
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in self.logdir.glob("*.log"))


@pytest.fixture
def planes(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    llama_triple_fp32: TinyTriple,
) -> Iterator[Planes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    (tmp_path / "store").mkdir()
    env = service_env(
        redis_server.url,
        tmp_path / "store",
        [llama_triple_fp32.base.parent],
        REALIGN_ENGINE="torch",
        REALIGN_ENGINE_WAIT_S="60",
        REALIGN_JOB_TIME_LIMIT_S="300",
        REALIGN_VISIBILITY_TIMEOUT_S="600",
        REALIGN_SERVE_LOAD_TIMEOUT_S=str(LOAD_TIMEOUT_S),
        REALIGN_SERVE_REPLICAS="all",
    )
    p = Planes(env, logs)
    try:
        yield p
    finally:
        p.stop_all()


def submit(api: str, triple: TinyTriple, name: str, alpha: float) -> str:
    body = merge_body(triple, serve=True, name=name, alpha=alpha)
    response = httpx.post(f"{api}/v1/merges", json=body, timeout=30)
    assert response.status_code in (200, 201, 202), response.text
    return str(response.json()["id"])


def job_when(api: str, job_id: str, done: Any, planes: Planes, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = httpx.get(f"{api}/v1/merges/{job_id}", timeout=10).json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id}: {job}\n{planes.logs()}"
        time.sleep(0.2)


def ended(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def greedy(url: str, model: str) -> str:
    body = {"model": model, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_two_serving_replicas_answer_a_served_merge_alike(
    planes: Planes, llama_triple_fp32: TinyTriple
) -> None:
    _, api = planes.serve("api", "api")
    planes.start("worker", "worker", "--name", "w1@%h")
    replicas = [planes.serve(f"serving{i}", "serving")[1] for i in (1, 2)]
    assert httpx.get(f"{api}/v1/models").status_code == 404  # the job plane serves no model
    job_id = submit(api, llama_triple_fp32, "shared", alpha=0.75)
    job = job_when(api, job_id, ended, planes, timeout=240)
    assert (job["status"], job["stage"]) == ("succeeded", "load"), job["error"]
    for url in replicas:  # REALIGN_SERVE_REPLICAS=all: loaded on both before it ended
        cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert cards["shared"]["realign"]["state"] == "ready", cards
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 200 and "replica serving@" in ready.json()["detail"]
    answers = [greedy(url, "shared") for url in replicas]
    assert answers[0] == answers[1] and answers[0]
    events = httpx.get(f"{api}/v1/merges/{job_id}/events").json()
    note = next(e["message"] for e in events if "ready on" in e["message"])
    assert note.count("serving@") == 2, note


def test_a_replica_that_starts_later_ends_the_job_and_a_killed_one_times_out(
    planes: Planes,
    llama_triple_fp32: TinyTriple,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    _, api = planes.serve("api", "api")
    planes.start("worker", "worker", "--name", "w1@%h")

    # no serving replica yet: the job waits at its load stage...
    first = submit(api, llama_triple_fp32, "later", alpha=0.5)
    job = job_when(api, first, lambda j: j["stage"] == "load" or ended(j), planes, 180)
    time.sleep(1.0)
    job = httpx.get(f"{api}/v1/merges/{first}").json()
    assert (job["status"], job["stage"]) == ("running", "load"), job
    # ...and a replica started afterwards finds the notice in the records and ends it
    replica, url = planes.serve("serving1", "serving")
    job = job_when(api, first, ended, planes, timeout=LOAD_TIMEOUT_S)
    assert job["status"] == "succeeded", job["error"]
    assert greedy(url, "later")

    # a replica SIGKILLed while loading: the job fails with load_timeout, naming it. The
    # kill lands between its "loading" and "ready" reports (an engine start takes far
    # longer than the 5 ms poll; the model's files are checked before any engine reads
    # them, so a damaged file would fail the load instead of hanging it).
    second = submit(api, llama_triple_fp32, "stuck", alpha=0.25)
    reports = f"realign:serve:notice:{second}:reports"
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    deadline = time.monotonic() + 180
    while not any(json.loads(r)["state"] == "loading" for r in client.lrange(reports, 0, -1)):
        assert time.monotonic() < deadline, planes.logs()
        time.sleep(0.005)
    replica.kill()
    replica.wait(timeout=10)
    job = job_when(api, second, ended, planes, timeout=LOAD_TIMEOUT_S + 30)
    assert job["status"] == "failed" and job["error"]["code"] == "load_timeout", job
    message = job["error"]["message"]
    assert f":{replica.pid} stopped while loading" in message, message
    assert "REALIGN_SERVE_LOAD_TIMEOUT_S" in message and "/admin/models/stuck/load" in message
