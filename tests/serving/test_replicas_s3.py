"""Serving replicas on other nodes: they share only Redis and the object store.

Real processes on loopback as on separate machines: `realign serve --role api`, a
`realign worker` and two `realign serve --role serving` replicas, each with its OWN node
cache (REALIGN_MODELS_CACHE_DIR), all on one bucket of a real S3 server (moto). The
catalog carries store keys, so each replica fetches the merged model from the bucket
(checking every file's sha256), pins it in its cache while its engine holds it, and
serves it; a damaged object is refused. The admin's engine routes work through the job
plane, where a gateway sends `/admin/*`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.core.errors import ArtifactInUseError
from app.demo.tiny import TinyTriple
from app.store.local import LocalStore
from tests.api.live import merge_body
from tests.jobs.conftest import RedisServer, redis_server, service_env  # noqa: F401
from tests.s3server import S3Server
from tests.serving.planes import QUESTION, Planes, ended, greedy, job_when, submit

pytestmark = pytest.mark.slow
LOAD_TIMEOUT_S = 180  # counts from the notice: covers replicas started after it, on a busy machine


def cache(planes: Planes, name: str) -> Path:
    """The node cache of process ``name`` (a directory of its own)."""
    return planes.logdir.parent / f"cache-{name}"


def node(planes: Planes, name: str) -> dict[str, str]:
    return {"REALIGN_MODELS_CACHE_DIR": str(cache(planes, name))}


@pytest.fixture
def cluster(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    s3_server: S3Server,
    bucket: str,
    llama_triple_fp32: TinyTriple,
) -> Iterator[Planes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    env = service_env(
        redis_server.url,
        tmp_path / "no-shared-store",  # every process below names its own cache
        [llama_triple_fp32.base.parent],
        REALIGN_STORE_URL=f"s3://{bucket}/realign",
        REALIGN_S3_ENDPOINT_URL=s3_server.endpoint,
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


def start(planes: Planes, replicas: int) -> tuple[str, list[str]]:
    """The job plane, a worker, and ``replicas`` serving replicas, each its own node."""
    _, api = planes.serve("api", "api", **node(planes, "api"))
    planes.start("worker", "worker", "--name", "w1@%h", **node(planes, "worker"))
    urls = [planes.serve(f"serving{i}", "serving", **node(planes, f"serving{i}"))[1]
            for i in range(1, replicas + 1)]  # fmt: skip
    return api, urls


def admin(api: str, method: str, path: str) -> httpx.Response:
    return httpx.request(method, f"{api}{path}", timeout=LOAD_TIMEOUT_S + 30)


def test_replicas_with_their_own_caches_load_a_served_merge_from_the_bucket(
    cluster: Planes,
    llama_triple_fp32: TinyTriple,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    api, replicas = start(cluster, 2)
    job_id = submit(api, llama_triple_fp32, "shared", alpha=0.75)
    job = job_when(api, job_id, ended, cluster, timeout=240)
    assert (job["status"], job["stage"]) == ("succeeded", "load"), job["error"]
    key = job["result"]["merged_key"]

    # the hand-off carries store keys, never a path on the worker's disk
    entry = json.loads(redis.Redis.from_url(redis_server.url).get("realign:model:shared") or "")
    assert entry["merged_key"] == key and "path" not in entry and "residual_dir" not in entry
    assert str(cache(cluster, "worker")) not in json.dumps(entry)
    for name in ("worker", "serving1", "serving2"):  # each node has its own copy
        assert (cache(cluster, name) / "merged" / key / "realign.json").is_file(), name
    answers = [greedy(url, "shared") for url in replicas]
    assert answers[0] == answers[1] and answers[0]

    # the replica pins what its engine holds: its node cache cannot drop it meanwhile
    with pytest.raises(ArtifactInUseError):
        LocalStore(cache(cluster, "serving1")).remove(key, "merged")

    # the admin's engine routes, through the job plane
    engines = admin(api, "GET", "/admin/engines").json()
    assert sorted(e["replica"].split("@")[0] for e in engines) == ["serving", "serving"]
    assert {(e["model"], e["state"]) for e in engines} == {("shared", "ready")}
    unloaded = admin(api, "POST", "/admin/models/shared/unload")
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json()["unloaded"] is True and len(unloaded.json()["replicas"]) == 2
    assert admin(api, "GET", "/admin/engines").json() == []
    # unpinned now: this node's copy can go (and is fetched again on the next load)
    LocalStore(cache(cluster, "serving1")).remove(key, "merged")
    loaded = admin(api, "POST", "/admin/models/shared/load")
    assert loaded.status_code == 200, loaded.text
    body: dict[str, Any] = loaded.json()
    assert body["status"] == "ready" and body["how"] == "started a new engine"
    assert len(body["replicas"]) == 2, body
    assert (cache(cluster, "serving1") / "merged" / key / "realign.json").is_file()
    assert len(admin(api, "GET", "/admin/engines").json()) == 2
    assert [greedy(url, "shared") for url in replicas] == answers
    missing = admin(api, "POST", "/admin/models/no-such-model/load")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"

    # an in-engine merge: each replica fetches the residual pack from the bucket
    body = merge_body(llama_triple_fp32, serve=True, name="inline", serve_mode="in_engine")
    inline = httpx.post(f"{api}/v1/merges", json=body, timeout=30).json()["id"]
    job = job_when(api, inline, ended, cluster, timeout=240)
    assert job["status"] == "succeeded", job["error"]
    residual = job["result"]["residual_key"]
    for name in ("serving1", "serving2"):
        assert (cache(cluster, name) / "residuals" / residual / "manifest.json").is_file()
    inline_answers = [greedy(url, "inline") for url in replicas]
    assert inline_answers[0] == inline_answers[1] and inline_answers[0]


def test_a_damaged_object_in_the_bucket_is_refused_and_nothing_is_served(
    cluster: Planes,
    llama_triple_fp32: TinyTriple,
    s3_server: S3Server,
    bucket: str,
) -> None:
    api, _ = start(cluster, 0)
    job_id = submit(api, llama_triple_fp32, "damaged", alpha=0.5)
    # no replica yet: the job waits at its load stage, the model published in the bucket
    job = job_when(api, job_id, lambda j: j["stage"] == "load" or ended(j), cluster, 180)
    assert not ended(job), job
    key = job["result"]["merged_key"]
    s3 = s3_server.client()
    prefix = f"realign/merged/{key}/"
    names = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    shard = next(n for n in sorted(names) if n.endswith(".safetensors"))
    data = bytearray(s3.get_object(Bucket=bucket, Key=shard)["Body"].read())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights
    s3.put_object(Bucket=bucket, Key=shard, Body=bytes(data))

    replicas = [
        cluster.serve(f"serving{i}", "serving", **node(cluster, f"serving{i}"))[1] for i in (1, 2)
    ]
    job = job_when(api, job_id, ended, cluster, timeout=LOAD_TIMEOUT_S + 30)
    assert job["status"] == "failed" and job["error"]["code"] == "load_failed", job
    message = job["error"]["message"]
    assert f"s3 object {shard} does not match its recorded sha256" in message, message

    # nothing served: each replica answers with the reason, and holds no engine
    for url in replicas:
        body = {"model": "damaged", "messages": QUESTION, "max_tokens": 4}
        chat = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert chat.status_code == 503, chat.text
        error = chat.json()["error"]
        assert error["code"] == "model_load_failed" and "recorded sha256" in error["message"]
        cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert cards["damaged"]["realign"]["state"] == "failed"
    assert admin(api, "GET", "/admin/engines").json() == []
    for name in ("serving1", "serving2"):  # the bad download is kept aside, not served
        assert not (cache(cluster, name) / "merged" / key).exists()
        assert list((cache(cluster, name) / ".quarantine").glob(f"{key}.*"))

    # an admin's load through the job plane fetches again, and is refused the same way
    again = admin(api, "POST", "/admin/models/damaged/load")
    assert again.status_code == 503, again.text
    error = again.json()["error"]
    assert error["code"] == "model_load_failed" and "recorded sha256" in error["message"]
    assert again.headers["x-should-retry"] == "false"
