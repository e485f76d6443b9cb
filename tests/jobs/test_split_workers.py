"""A merge split by output shard across two real `celery worker` processes on a real
Redis and a shared store directory: both take part, the model is byte-identical to a
single-process merge, a cancel publishes nothing and stops every shard task, a
SIGKILLed worker's shard is redelivered and the job still succeeds. (Workers that
share only Redis and an object store: tests/jobs/test_split_object_store.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.core.settings import Settings, get_settings
from app.demo.tiny import TinyTriple
from app.jobs.kv import RedisKV
from app.jobs.models import Caller, JobRecord, JobStatus, MergeSpec
from app.jobs.service import JobService
from app.merge import compute, merge_to_store
from tests.helpers import card_without_time
from tests.jobs.conftest import ROOT, RedisServer, Workers, service_env

pytestmark = pytest.mark.slow
ALICE = Caller(name="alice")
MAX_SHARD_GB = "0.0005"  # the tiny model (~3 MB) then has 6+ output shards


@pytest.fixture
def env(redis_server: RedisServer, llama_triple: TinyTriple, store_dir: Path) -> dict[str, str]:
    return service_env(
        redis_server.url,
        store_dir,
        [llama_triple.base.parent],
        REALIGN_MAX_SHARD_GB=MAX_SHARD_GB,
        REALIGN_MERGE_PARALLEL_MIN_SHARDS="2",
        REALIGN_MAX_READ_MBPS="1",  # ~1 s per shard: long enough to cancel or kill mid-way
        REALIGN_JOB_LEASE_S="4",  # a dead worker's shard lease lapses quickly
    )


@pytest.fixture
def workers(env: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(env, tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture
def service(env: dict[str, str], store_dir: Path, llama_triple: TinyTriple) -> JobService:
    settings = Settings(
        redis_url=env["REALIGN_REDIS_URL"],
        models_cache_dir=store_dir,
        allowed_roots=[llama_triple.base.parent],
        job_time_limit_s=8,
        visibility_timeout_s=10,
    )
    return JobService.from_settings(settings)


def _spec(t: TinyTriple) -> MergeSpec:
    return MergeSpec(base=str(t.base), instruct=str(t.instruct), target=str(t.new_base))


def _two_workers(service: JobService, workers: Workers) -> list[object]:
    procs = [workers.start("w1"), workers.start("w2")]
    end = time.monotonic() + 60
    while len(service.workers()) < 2 and time.monotonic() < end:
        time.sleep(0.2)
    assert len(service.workers()) == 2, workers.logs()
    return procs  # type: ignore[return-value]


def _wait(
    svc: JobService, job_id: str, pred: object, timeout: float, workers: Workers
) -> JobRecord:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rec = svc.get(job_id, ALICE)
        if pred(rec):  # type: ignore[operator]
            return rec
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: condition not met in {timeout} s\n{workers.logs()}")


def _splitting(rec: JobRecord) -> bool:
    return rec.status == JobStatus.running and rec.stage is not None and rec.progress.bytes_done > 0


def _writers(svc: JobService, job_id: str) -> set[str]:
    found = (re.match(r"\S+ written by (\S+)", e.message) for e in svc.events(job_id, ALICE))
    return {m.group(1) for m in found if m}


def _precompute(t: TinyTriple, store: Path) -> None:
    """Store the pair's residual, so the job goes straight to the split apply."""
    compute(str(t.base), str(t.instruct), store=store)


def _lease_keys(svc: JobService, job_id: str) -> list[str]:
    kv = RedisKV(svc.settings.redis_url or "")
    return [k for k in kv.scan(f"realign:job:{job_id}:split:") if k.endswith(":lease")]


def _published(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}


def _single_process(t: TinyTriple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The same merge by one process (the store path a one-task job takes)."""
    monkeypatch.setenv("REALIGN_MAX_SHARD_GB", MAX_SHARD_GB)
    get_settings.cache_clear()
    try:
        done = merge_to_store(
            base=str(t.base), instruct=str(t.instruct), target=str(t.new_base),
            store=tmp_path / "reference-store",
        )  # fmt: skip
    finally:
        monkeypatch.delenv("REALIGN_MAX_SHARD_GB")
        get_settings.cache_clear()
    return done.path


def _cli_merge(t: TinyTriple, tmp_path: Path) -> Path:
    """`realign merge` of the same inputs, as a user runs it."""
    out = tmp_path / "cli-merged"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALIGN_")}
    env["REALIGN_MAX_SHARD_GB"] = MAX_SHARD_GB
    cmd = [sys.executable, "-m", "app.cli", "merge", "-b", str(t.base), "-i", str(t.instruct)]
    cmd += ["-t", str(t.new_base), "-o", str(out), "--store", str(tmp_path / "cli-store")]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    return out


def _same_model(got: Path, want: Path, *, manifest_hashes: bool = True) -> None:
    a, b = _published(got), _published(want)
    assert a.keys() == b.keys()
    assert len([n for n in a if n.endswith(".safetensors")]) >= 3
    for name in a:
        if name == "README.md":  # the card prints the time, to the minute
            assert card_without_time(a[name]) == card_without_time(b[name])
            continue
        if name == "realign.json":
            ma, mb = json.loads(a[name]), json.loads(b[name])
            for m in (ma, mb):
                m.pop("created_at")
                m.pop("manifest_sha256")  # seals the creation time too
                if not manifest_hashes:  # `realign merge` does not hash what it writes
                    m["files"] = {n: e["size"] for n, e in m["files"].items()}
                    m["other_files"] = {}
            assert ma == mb
            continue
        assert a[name] == b[name], name


def test_split_merge_runs_on_both_workers_and_matches_one_process(
    service: JobService,
    workers: Workers,
    llama_triple: TinyTriple,
    store_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _two_workers(service, workers)
    rec, _ = service.submit(_spec(llama_triple), ALICE)  # a new pair: residual first
    done = _wait(service, rec.id, lambda r: r.status.terminal, 120, workers)
    assert done.status == JobStatus.succeeded, (done.error, workers.logs())
    assert done.result is not None
    events = [e.message for e in service.events(rec.id, ALICE)]
    assert any(re.match(r"split into \d+ shard tasks", m) for m in events), events
    assert len(_writers(service, rec.id)) == 2, events  # both workers wrote shards
    out = Path(done.result.output)
    _same_model(out, _single_process(llama_triple, tmp_path, monkeypatch))
    _same_model(out, _cli_merge(llama_triple, tmp_path), manifest_hashes=False)
    assert list((store_dir / ".shards").iterdir()) == []  # staging cleaned up
    assert _lease_keys(service, rec.id) == []


def test_cancel_mid_split_publishes_nothing_and_stops_every_shard_task(
    service: JobService, workers: Workers, llama_triple: TinyTriple, store_dir: Path
) -> None:
    _precompute(llama_triple, store_dir)
    _two_workers(service, workers)
    rec, _ = service.submit(_spec(llama_triple), ALICE)
    _wait(service, rec.id, _splitting, 60, workers)
    service.cancel(rec.id, ALICE)
    done = _wait(service, rec.id, lambda r: r.status.terminal, 30, workers)
    assert done.status == JobStatus.cancelled, (done.error, workers.logs())
    end = time.monotonic() + 15
    while _lease_keys(service, rec.id) and time.monotonic() < end:
        time.sleep(0.1)
    assert _lease_keys(service, rec.id) == [], "a shard task still runs after the cancel"
    time.sleep(2.0)  # a late progress write must not bring the job back to life
    assert service.get(rec.id, ALICE).status == JobStatus.cancelled
    assert list((store_dir / "merged").iterdir()) == []
    shards = store_dir / ".shards"
    assert not shards.exists() or list(shards.iterdir()) == []
    admin = redis.Redis.from_url(service.settings.redis_url or "")
    kept = [k for k in admin.scan_iter(f"realign:job:{rec.id}:split:*") if admin.ttl(k) == -1]
    assert kept == [], "records of the split kept without expiry"


def test_sigkill_of_a_worker_mid_shard_still_ends_the_job_identically(
    service: JobService,
    workers: Workers,
    llama_triple: TinyTriple,
    store_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _precompute(llama_triple, store_dir)
    w1, _ = _two_workers(service, workers)
    rec, _ = service.submit(_spec(llama_triple), ALICE)
    _wait(service, rec.id, _splitting, 60, workers)
    kv = RedisKV(service.settings.redis_url or "")
    end = time.monotonic() + 30
    while not any((kv.get(k) or "").startswith("w1@") for k in _lease_keys(service, rec.id)):
        assert time.monotonic() < end, workers.logs()
        time.sleep(0.02)
    workers.kill(w1)  # type: ignore[arg-type]  (mid-shard: it holds a shard's lease)
    assert list((store_dir / "merged").iterdir()) == []
    done = _wait(service, rec.id, lambda r: r.status.terminal, 120, workers)
    assert done.status == JobStatus.succeeded, (done.error, workers.logs())
    assert done.result is not None
    _same_model(Path(done.result.output), _single_process(llama_triple, tmp_path, monkeypatch))


def test_a_shard_past_the_time_limit_fails_the_job_and_publishes_nothing(
    env: dict[str, str],
    service: JobService,
    llama_triple: TinyTriple,
    store_dir: Path,
    tmp_path: Path,
) -> None:
    """Celery's time limits never fire in the workers' solo pool: a shard task that runs
    past REALIGN_JOB_TIME_LIMIT_S is stopped by its lease keeper, and the job fails
    'time_limit' with nothing published and no shard task left running."""
    _precompute(llama_triple, store_dir)
    slow = {**env, "REALIGN_MAX_READ_MBPS": "0.2", "REALIGN_JOB_TIME_LIMIT_S": "2"}
    pool = Workers(slow, tmp_path)
    try:
        pool.start("w1")
        rec, _ = service.submit(_spec(llama_triple), ALICE)
        done = _wait(service, rec.id, lambda r: r.status.terminal, 120, pool)
        assert done.status == JobStatus.failed, (done.error, pool.logs())
        assert done.error is not None and done.error.code == "time_limit", done.error
        assert "REALIGN_JOB_TIME_LIMIT_S (2 s)" in done.error.message
        assert any("shard tasks" in e.message for e in service.events(rec.id, ALICE))
        end = time.monotonic() + 15
        while _lease_keys(service, rec.id) and time.monotonic() < end:
            time.sleep(0.1)
        assert _lease_keys(service, rec.id) == []
        assert list((store_dir / "merged").iterdir()) == []
    finally:
        pool.stop_all()
