"""Issue 9, point 4: the job plane and the serving plane as separate processes.

Real processes on loopback sharing one Redis and one store: `realign serve --role api`,
a `realign worker`, and `realign serve --role serving` replicas on their own ports. A
``serve: true`` merge is announced to every replica (Redis pub/sub, and the records for
replicas that start later), each loads it from the store and reports, and the job ends
from the reports — no process polls a queue to end it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from app.demo.tiny import TinyTriple
from tests.jobs.conftest import RedisServer, redis_server, service_env  # noqa: F401
from tests.serving.planes import Planes, ended, greedy, job_when, submit

pytestmark = pytest.mark.slow
LOAD_TIMEOUT_S = 60  # REALIGN_SERVE_LOAD_TIMEOUT_S of the worker (the judge)
# Run in a replica first: its load of the model "stuck" reports "loading", then waits.
HOLD_STUCK = """
import asyncio
from app.serving.replica import Replica
act = Replica._act
async def held(self, notice):
    while notice.model_id == "stuck":
        await asyncio.sleep(1)
    return await act(self, notice)
Replica._act = held
"""


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
    replica, url = planes.serve("serving1", "serving", prelude=HOLD_STUCK)
    job = job_when(api, first, ended, planes, timeout=LOAD_TIMEOUT_S)
    assert job["status"] == "succeeded", job["error"]
    assert greedy(url, "later")

    # a replica SIGKILLed while loading: the job fails with load_timeout, naming it. The
    # kill lands between its "loading" and "ready" reports: the replica holds the load
    # of "stuck" there (HOLD_STUCK), so a busy machine cannot let it finish first.
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
