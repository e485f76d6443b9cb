"""Object store faults with real means: a builder SIGKILLed mid-upload, a flipped byte
in the bucket, two builder processes racing for one key, the S3 server going away."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app.core.errors import ArtifactCorruptError, ArtifactNotFoundError, StoreUnavailableError
from app.demo.tiny import TinyTriple
from app.merge import apply, compute, verify
from app.store.remote import COMMIT, STAGING_TTL_S
from tests.helpers import start_together
from tests.jobs.conftest import RedisServer, free_port
from tests.s3server import S3_ENV, S3Server, object_settings, object_store

ROOT = Path(__file__).resolve().parents[2]


def _spawn(script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env={**os.environ, **S3_ENV, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _settings_code(s3_server: S3Server, bucket: str, cache: Path, **extra: object) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in extra.items())
    return (
        "from app.core.settings import Settings\n"
        f"settings = Settings(models_cache_dir={str(cache)!r}, "
        f"store_url='s3://{bucket}/realign', s3_endpoint_url={s3_server.endpoint!r}"
        + (f", {fields}" if fields else "")
        + ")\n"
    )


def test_builder_killed_mid_upload_publishes_nothing(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    t = llama_triple
    script = _settings_code(s3_server, bucket, tmp_path / "dead") + textwrap.dedent(f"""
        import sys
        import time
        import app.store.commit as remote
        real = remote.upload_file
        def upload_then_hang(*args, **kw):
            real(*args, **kw)
            sys.stdout.write("uploaded\\n")  # one write: parallel uploads may all get here
            sys.stdout.flush()
            time.sleep(600)
        remote.upload_file = upload_then_hang
        from app.merge import compute
        compute({str(t.base)!r}, {str(t.instruct)!r}, settings=settings)
    """)
    proc = _spawn(script)
    assert proc.stdout is not None and proc.stderr is not None
    seen = []
    for line in proc.stdout:  # other output (warnings) may come first
        seen.append(line)
        if "uploaded" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert seen and "uploaded" in seen[-1], "".join(seen) + proc.stderr.read()
    names = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert any("/.build-" in n for n in names) and not any(n.endswith(COMMIT) for n in names)
    reader = object_store(s3_server, bucket, tmp_path / "reader")
    assert reader.artifacts() == []
    with pytest.raises(ArtifactNotFoundError):
        reader.resolve("")
    res = compute(str(t.base), str(t.instruct), store=reader)  # a new builder publishes
    assert res.created and reader.exists(res.key)
    assert reader.bucket.sweep_staging(now=time.time() + STAGING_TTL_S + 1) >= 1
    left = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    builds = {n.split("/.build-")[1].split("/")[0] for n in left if "/.build-" in n}
    assert len(builds) == 1  # the dead builder's upload is gone, the committed one stays


def _first_shard(s3_server: S3Server, bucket: str, key: str) -> str:
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"realign/residuals/{key}/")
    weights = (".safetensors", ".frames")
    return sorted(o["Key"] for o in listing["Contents"] if o["Key"].endswith(weights))[0]


def _flip_last_byte(s3_server: S3Server, bucket: str, name: str) -> None:
    client = s3_server.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=name)["Body"].read())
    data[-1] ^= 0xFF
    client.put_object(Bucket=bucket, Key=name, Body=bytes(data))


def test_flipped_byte_in_bucket_is_caught_and_rebuilt(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    t = llama_triple
    node_a = object_store(s3_server, bucket, tmp_path / "a")
    key = compute(str(t.base), str(t.instruct), store=node_a).key
    _flip_last_byte(s3_server, bucket, _first_shard(s3_server, bucket, key))
    node_b = object_store(s3_server, bucket, tmp_path / "b")
    match = "does not match its recorded sha256"
    with pytest.raises(ArtifactCorruptError, match=match), node_b.using(key):
        pass
    assert not node_b.cache.exists(key)  # nothing corrupt is handed out
    (kept,) = node_b.cache.root.glob(f".quarantine/{key}.*/")  # the evidence, not a copy
    names = {p.name for p in kept.rglob("*") if p.is_file()}
    bad = _first_shard(s3_server, bucket, key).rsplit("/", 1)[1]
    assert bad in names and all(n == bad or n.endswith(".json") for n in names), names
    heard: list[str] = []
    out = apply(key, str(t.new_base), tmp_path / "out", store=node_b, notice=heard.append)
    assert out.out.is_dir() and heard and "rebuilt" in heard[0]
    assert node_b.quarantine_count() == 1
    node_c = object_store(s3_server, bucket, tmp_path / "c")  # the bucket copy is whole again
    assert node_c.verify(key).key == key


@pytest.mark.parametrize("fault", ["deleted", "truncated"])
def test_a_data_object_gone_from_the_bucket_is_caught_and_rebuilt(
    fault: str, llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """A lifecycle rule or an operator deleted (or cut short) one object of a committed
    pack: reading it is a damaged artifact, rebuilt from its sources, not 'store
    unavailable' forever."""
    t = llama_triple
    node_a = object_store(s3_server, bucket, tmp_path / "a")
    key = compute(str(t.base), str(t.instruct), store=node_a).key
    name, client = _first_shard(s3_server, bucket, key), s3_server.client()
    if fault == "deleted":
        client.delete_object(Bucket=bucket, Key=name)
    else:
        data = client.get_object(Bucket=bucket, Key=name)["Body"].read()
        client.put_object(Bucket=bucket, Key=name, Body=data[: len(data) // 2])
    node_b = object_store(s3_server, bucket, tmp_path / "b")
    with pytest.raises(ArtifactCorruptError), node_b.using(key):
        pass
    assert not node_b.cache.exists(key)
    heard: list[str] = []
    out = apply(key, str(t.new_base), tmp_path / "out", store=node_b, notice=heard.append)
    assert out.out.is_dir() and heard and "rebuilt" in heard[0]
    node_c = object_store(s3_server, bucket, tmp_path / "c")  # the bucket copy is whole again
    assert node_c.verify(key).key == key


def test_a_byte_flipped_in_one_nodes_cache_leaves_the_bucket_copy_alone(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """The damage is in node A's cached copy (a disk fault there), not in the bucket:
    A's copy is quarantined and downloaded again; the artifact stays published for
    every node, even with its sources gone."""
    t = llama_triple
    node_a = object_store(s3_server, bucket, tmp_path / "a")
    key = compute(str(t.base), str(t.instruct), store=node_a).key
    cached = node_a.cache.path(key, "residuals")
    shard = sorted(p for p in cached.iterdir() if p.suffix in (".safetensors", ".frames"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert verify(key, node_a).key == key  # healed from the bucket
    assert node_a.quarantine_count() == 1 and shard.read_bytes() != bytes(data)
    node_b = object_store(s3_server, bucket, tmp_path / "b")
    assert node_b.exists(key) and node_b.verify(key).key == key


def test_flipped_byte_without_sources_says_what_to_do(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    from tests.helpers import copy_model

    t = llama_triple
    base, instruct = copy_model(t.base, tmp_path / "base"), copy_model(t.instruct, tmp_path / "ins")
    node_a = object_store(s3_server, bucket, tmp_path / "a")
    key = compute(str(base), str(instruct), store=node_a).key
    _flip_last_byte(s3_server, bucket, _first_shard(s3_server, bucket, key))
    import shutil

    shutil.rmtree(base)
    node_b = object_store(s3_server, bucket, tmp_path / "b")
    with pytest.raises(ArtifactCorruptError, match="compute it again"):
        verify(key, node_b)
    assert not node_b.exists(key)  # hidden from every reader, kept for inspection
    assert not node_b.cache.exists(key)


def test_two_builder_processes_one_build_with_redis_lock(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    t = llama_triple
    redis = RedisServer(tmp_path / "redis")
    redis.workdir.mkdir()
    redis.start()
    go = tmp_path / "go"
    try:
        procs = []
        for node in ("a", "b"):  # two machines: two caches, one bucket, one Redis
            script = _settings_code(
                s3_server, bucket, tmp_path / node, redis_url=redis.url
            ) + textwrap.dedent(f"""
                import time
                from pathlib import Path
                from app.jobs.locks import cluster_store
                from app.merge import compute
                store = cluster_store(settings)
                print("ready", flush=True)
                while not Path({str(go)!r}).exists():
                    time.sleep(0.01)
                res = compute({str(t.base)!r}, {str(t.instruct)!r}, settings=settings, store=store,
                              progress=lambda p: time.sleep(0.05))
                print("result", res.key, res.created, flush=True)
            """)
            procs.append(_spawn(script))
        start_together(procs, go)
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        go.touch()  # never left waiting
        redis.stop()
    results = [o.strip().splitlines()[-1].split() for o, _ in outs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert results[0][1] == results[1][1]
    assert sorted(r[2] for r in results) == ["False", "True"]  # one build, one reuse
    listing = s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert sum(o["Key"].endswith(COMMIT) for o in listing) == 1


def test_store_down_is_a_typed_error_and_no_job_stays_running(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    from app.jobs.models import Caller, JobStatus, MergeSpec
    from app.jobs.service import JobService
    from tests.jobs.test_embedded import wait

    t = llama_triple
    server = S3Server(free_port())
    server.start()
    bucket = server.bucket()
    (tmp_path / "cache").mkdir()
    settings = object_settings(server, bucket, tmp_path / "cache", allowed_roots=[t.base.parent])
    server.stop()
    env = {
        **os.environ,
        **S3_ENV,
        "PYTHONPATH": str(ROOT),
        "REALIGN_STORE_URL": settings.store_url,
        "REALIGN_S3_ENDPOINT_URL": server.endpoint,
        "REALIGN_MODELS_CACHE_DIR": str(tmp_path / "cache"),
    }
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "compute",
            "-b",
            str(t.base),
            "-i",
            str(t.instruct),
            "-q",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0
    assert "object store unreachable" in res.stderr and "Traceback" not in res.stderr
    svc = JobService.from_settings(settings)
    svc.start()
    try:
        spec = MergeSpec(base=str(t.base), instruct=str(t.instruct), target=str(t.new_base))
        rec, _ = svc.submit(spec, Caller(name="alice"))
        done = wait(svc, rec.id, timeout=120)
    finally:
        svc.stop()
    assert done.status == JobStatus.failed
    assert done.error is not None and done.error.code == "store_unavailable"
    assert "object store unreachable" in done.error.message
    with pytest.raises(StoreUnavailableError):
        object_store(server, bucket, tmp_path / "other").exists("0" * 32)
