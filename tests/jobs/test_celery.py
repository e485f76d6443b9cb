"""The distributed service: a real Redis, real `celery worker` processes, real crashes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.errors import RecordsUnavailableError
from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from app.jobs.kv import RedisKV
from app.jobs.models import Caller, JobRecord, JobStatus, MergeSpec
from app.jobs.records import JobRecords
from app.jobs.runner import JobRunner
from app.jobs.service import JobService
from app.merge import merge_to_store
from tests.jobs.conftest import RedisServer, Workers, service_env

pytestmark = pytest.mark.slow
ALICE = Caller(name="alice")


@pytest.fixture
def env(redis_server: RedisServer, llama_triple: TinyTriple, store_dir: Path) -> dict[str, str]:
    # 4 MB/s: the tiny merge then takes ~3 s, long enough to kill a worker in the middle
    return service_env(
        redis_server.url, store_dir, [llama_triple.base.parent], REALIGN_MAX_READ_MBPS="4"
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


def wait_for(
    svc: JobService, job_id: str, pred: object, timeout: float, workers: Workers
) -> JobRecord:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            rec = svc.get(job_id, ALICE)
            if pred(rec):  # type: ignore[operator]
                return rec
        except (ConnectionError, RecordsUnavailableError):  # Redis restarting
            pass
        time.sleep(0.1)
    raise AssertionError(f"job {job_id}: condition not met in {timeout} s\n{workers.logs()}")


def digest(path: Path) -> dict[str, str]:
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.glob("*.safetensors"))
    }


def undisturbed(t: TinyTriple, tmp_path: Path) -> dict[str, str]:
    done = merge_to_store(
        base=str(t.base),
        instruct=str(t.instruct),
        target=str(t.new_base),
        store=tmp_path / "reference-store",
    )
    return digest(done.path)


def test_submit_poll_succeeded_with_worker(
    service: JobService, workers: Workers, llama_triple: TinyTriple, tmp_path: Path
) -> None:
    workers.start("w1")
    end = time.monotonic() + 30
    while not service.workers() and time.monotonic() < end:
        time.sleep(0.2)
    assert service.readiness() == (True, "ready"), workers.logs()
    (w,) = service.workers()
    assert w.device == "cpu" and {"gpu", "cpu"} <= set(w.queues)
    spec = MergeSpec(
        base=str(llama_triple.base),
        instruct=str(llama_triple.instruct),
        target=str(llama_triple.new_base),
    )
    rec, _ = service.submit(spec, ALICE)
    running = wait_for(service, rec.id, lambda r: r.status == JobStatus.running, 30, workers)
    assert service.workers()[0].current_job in (rec.id, None)
    assert running.stage is not None
    done = wait_for(service, rec.id, lambda r: r.status.terminal, 60, workers)
    assert done.status == JobStatus.succeeded, done.error
    assert done.result is not None
    assert digest(Path(done.result.output)) == undisturbed(llama_triple, tmp_path)
    assert service.queue_depths() == {"cpu": 0, "gpu": 0}


def test_sigkill_mid_merge_is_redelivered_and_completes_identically(
    service: JobService,
    workers: Workers,
    llama_triple: TinyTriple,
    tmp_path: Path,
    store_dir: Path,
) -> None:
    first = workers.start("doomed")
    spec = MergeSpec(
        base=str(llama_triple.base),
        instruct=str(llama_triple.instruct),
        target=str(llama_triple.new_base),
    )
    rec, _ = service.submit(spec, ALICE)
    wait_for(
        service,
        rec.id,
        lambda r: r.status == JobStatus.running and r.progress.bytes_done > 0,
        60,
        workers,
    )
    workers.kill(first)
    assert list(store_dir.glob("merged/*")) == []  # nothing half-published
    workers.start("rescuer")
    done = wait_for(service, rec.id, lambda r: r.status.terminal, 90, workers)
    assert done.status == JobStatus.succeeded, (done.error, workers.logs())
    assert done.result is not None
    assert digest(Path(done.result.output)) == undisturbed(llama_triple, tmp_path)
    records = JobRecords(RedisKV(service.settings.redis_url or ""))
    assert int(records.kv.get(f"realign:job:{rec.id}:deliveries") or 0) >= 2


def test_ties_job_on_a_worker_equals_the_engine(
    service: JobService, workers: Workers, llama_triple: TinyTriple, tmp_path: Path
) -> None:
    """A merge by TIES through Redis and a real worker process: the stored residual is
    computed, then trimmed, elected and applied tensor by tensor, in one task."""
    workers.start("w1")
    t = llama_triple
    pair = {"base": str(t.base), "instruct": str(t.instruct), "target": str(t.new_base)}
    spec = MergeSpec(**pair, method="ties", params={"density": 0.3})
    rec, _ = service.submit(spec, ALICE)
    done = wait_for(service, rec.id, lambda r: r.status.terminal, 90, workers)
    assert done.status == JobStatus.succeeded, (done.error, workers.logs())
    assert done.result is not None and done.result.manifest["method"] == "ties"
    ref = merge_to_store(
        **pair, method="ties", params={"density": 0.3}, store=tmp_path / "reference-store"
    )
    assert done.result.merged_key == ref.key
    assert digest(Path(done.result.output)) == digest(ref.path)


def test_redis_restart_during_a_job(
    service: JobService, workers: Workers, redis_server: RedisServer, llama_triple: TinyTriple
) -> None:
    workers.start("w1")
    spec = MergeSpec(
        base=str(llama_triple.base),
        instruct=str(llama_triple.instruct),
        target=str(llama_triple.new_base),
    )
    rec, _ = service.submit(spec, ALICE)
    wait_for(service, rec.id, lambda r: r.status == JobStatus.running, 60, workers)
    redis_server.restart(down_for=1.0)
    done = wait_for(service, rec.id, lambda r: r.status.terminal, 90, workers)
    assert done.status == JobStatus.succeeded, (done.error, workers.logs())


def test_delivery_cap_fails_a_job_that_keeps_killing_workers(
    redis_server: RedisServer, llama_triple: TinyTriple, store_dir: Path
) -> None:
    settings = Settings(
        redis_url=redis_server.url,
        models_cache_dir=store_dir,
        allowed_roots=[llama_triple.base.parent],
        max_deliveries=3,
    )
    records = JobRecords(RedisKV(redis_server.url))
    rec = JobRecord(
        id="mrg_crashy",
        owner="alice",
        spec=MergeSpec(
            base=str(llama_triple.base),
            instruct=str(llama_triple.instruct),
            target=str(llama_triple.new_base),
        ),
    )
    records.create(rec)
    for _ in range(3):  # three deliveries whose workers died: the count is what remains
        records.count_delivery(rec.id)
    JobRunner(records, settings, "w", lambda task, job: None).merge(rec.id)
    failed = records.get(rec.id)
    assert failed is not None and failed.status == JobStatus.failed and failed.error
    assert failed.error.code == "worker_lost" and "delivered 3 times" in failed.error.message
    assert failed.deliveries == 3  # the failing delivery did not run, so it is not counted
    assert list(store_dir.glob("merged/*")) == []


def test_timeouts_are_checked_at_start_up(redis_server: RedisServer) -> None:
    from app.core.errors import UnsafeSettingsError

    with pytest.raises(UnsafeSettingsError, match="VISIBILITY_TIMEOUT"):
        JobService.from_settings(
            Settings(redis_url=redis_server.url, job_time_limit_s=100, visibility_timeout_s=50)
        )
