"""Any fault in a job ends it ``failed`` with a code, publishes nothing and never leaves it
running: faults made by real means at each stage (a broken config, an input truncated
between validation and merge, a full tmpfs, a publish target on another mount, a model
that does not load), disk readiness, job records on a full disk, and a worker SIGKILLed
on every delivery."""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.api.app import create_app
from app.core.settings import Settings, get_settings
from app.demo.tiny import TinyTriple
from app.handoff.board import LoadBoard
from app.jobs.failures import job_error
from app.jobs.models import Caller, JobRecord, JobStage, JobStatus, MergeSpec
from app.jobs.records import JobRecords
from app.jobs.runner import JobRunner
from app.jobs.service import JobService
from app.jobs.sqlite_kv import SqliteKV
from app.serving.service import ServingService
from tests.api.live import LiveServer, assert_error, merge_body
from tests.api.live import wait_for as wait_http
from tests.helpers import stored
from tests.jobs.conftest import RedisServer, Workers, service_env

ALICE = Caller(name="alice")


# -- fixtures and helpers ---------------------------------------------------------------
def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} failed (needs root): {done.stderr.strip()}")


def _umount(path: Path) -> None:
    # a process-wide SQLite handle (the store's hash cache) may still hold a file there
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB tmpfs: a disk that fills up for real."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    _mount("-t", "tmpfs", "-o", "size=8M", "tmpfs", str(path))
    yield path
    _umount(path)


@pytest.fixture
def triple(llama_triple: TinyTriple, tmp_path: Path) -> TinyTriple:
    """A private copy of the llama triple, free to damage."""
    root = tmp_path / "models"
    for side in ("base", "instruct", "new_base"):
        shutil.copytree(getattr(llama_triple, side), root / side)
    return TinyTriple(base=root / "base", instruct=root / "instruct", new_base=root / "new_base")


class Harness:
    """A real runner on embedded records; ``enqueue`` only notes the next step, so a test
    can act between validation and merge."""

    def __init__(self, store: Path, records_db: Path, **settings: object) -> None:
        self.store = store
        self.settings = Settings(models_cache_dir=store, **settings)  # type: ignore[arg-type]
        self.records = JobRecords(SqliteKV(records_db))
        self.queued: list[str] = []
        self.runner = JobRunner(
            self.records, self.settings, "w1", lambda task, job: self.queued.append(job)
        )
        self._n = 0

    def validate(self, spec: MergeSpec) -> str:
        self._n += 1
        rec = JobRecord(id=f"mrg_fault{self._n}", owner="alice", spec=spec)
        self.records.create(rec)
        self.runner.validate(rec.id)
        return rec.id

    def merge(self, job_id: str) -> JobRecord:
        if job_id in self.queued:
            self.runner.merge(job_id)
        rec = self.records.get(job_id)
        assert rec is not None
        return rec

    def run(self, spec: MergeSpec) -> JobRecord:
        return self.merge(self.validate(spec))


def pair(t: TinyTriple, **kw: object) -> MergeSpec:
    return MergeSpec(base=str(t.base), instruct=str(t.instruct), target=str(t.new_base), **kw)  # type: ignore[arg-type]


def assert_failed(rec: JobRecord, code: str, stage: str | None = None) -> str:
    assert rec.status == JobStatus.failed, (rec.status, rec.error)
    assert rec.error is not None and rec.error.code == code, rec.error
    if stage is not None:
        assert rec.stage is not None and rec.stage.value == stage
    assert "Traceback" not in rec.error.message
    return rec.error.message


# -- a fault at each stage --------------------------------------------------------------
def test_preflight_unexpected_exception_fails_the_job(
    triple: TinyTriple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug deep in preflight (an AttributeError nobody expected): the job fails (it
    used to stay 'validating'), naming stage and type, and pointing at the log."""
    import app.merge

    def broken(*args: object, **kwargs: object) -> None:
        raise AttributeError("'list' object has no attribute 'get'")

    monkeypatch.setattr(app.merge, "preflight", broken)
    h = Harness(tmp_path / "store", tmp_path / "jobs.sqlite")
    message = assert_failed(h.run(pair(triple)), "internal_error", "preflight")
    assert "preflight" in message and "AttributeError" in message and "log" in message
    assert h.queued == [] and stored(h.store) == []


def test_config_that_is_not_an_object_fails_as_corrupt(triple: TinyTriple, tmp_path: Path) -> None:
    (triple.new_base / "config.json").write_text("[]")
    h = Harness(tmp_path / "store", tmp_path / "jobs.sqlite")
    message = assert_failed(h.run(pair(triple)), "corrupt_checkpoint", "preflight")
    assert str(triple.new_base / "config.json") in message and "found a list" in message
    assert h.queued == [] and stored(h.store) == []


def test_residual_input_truncated_after_validation(triple: TinyTriple, tmp_path: Path) -> None:
    h = Harness(tmp_path / "store", tmp_path / "jobs.sqlite")
    job = h.validate(pair(triple))
    shard = triple.instruct / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    message = assert_failed(h.merge(job), "corrupt_checkpoint", "residual")
    assert shard.name in message
    assert stored(h.store) == []  # nothing published, staging cleaned


def test_apply_without_room_fails_insufficient_storage(
    triple: TinyTriple, tmpfs: Path, tmp_path: Path
) -> None:
    """The residual is stored; the tmpfs then has 1 MB left for a 3 MB merged model: the
    check before writing ends the job 'insufficient_storage' with the path and the
    numbers, and nothing partial is left (ENOSPC mid-write: tests/faults/test_disk.py)."""
    h = Harness(tmpfs, tmp_path / "jobs.sqlite")
    residual = h.run(MergeSpec(base=str(triple.base), instruct=str(triple.instruct)))
    assert residual.status == JobStatus.succeeded and residual.result is not None
    key = residual.result.residual_key
    with (tmpfs / "filler").open("wb") as f:
        f.write(b"\0" * (shutil.disk_usage(tmpfs).free - 1024**2))
    rec = h.run(MergeSpec(residual=key[:10], target=str(triple.new_base)))
    message = assert_failed(rec, "insufficient_storage")
    assert str(tmpfs) in message and "needs 3." in message and "bytes) free" in message
    assert stored(tmpfs) == [f"residuals/{key}"] + [
        p for p in stored(tmpfs) if p.startswith(f"residuals/{key}/")
    ]
    assert rec.resolved == {"residual": key}  # the prefix was pinned at validation


def test_publish_into_a_directory_on_another_mount(triple: TinyTriple, tmp_path: Path) -> None:
    """merged/ is a (read-only) bind mount: the rename that publishes fails; the job fails
    with the paths, nothing appears in merged/ and staging is cleaned."""
    store = tmp_path / "store"
    h = Harness(store, tmp_path / "jobs.sqlite")
    job = h.validate(pair(triple))
    merged = store / "merged"
    _mount("--bind", str(merged), str(merged))
    try:
        _mount("-o", "remount,bind,ro", str(merged))
        message = assert_failed(h.merge(job), "internal_error")
    finally:
        _umount(merged)
    assert "Invalid cross-device link" in message and str(merged) in message
    assert list(merged.iterdir()) == [] and list((store / ".staging").iterdir()) == []


def test_load_failure_fails_the_job(triple: TinyTriple, tmp_path: Path) -> None:
    """The merge succeeds, the merged model is then damaged, the serving side fails to
    load it: the job ends 'load_failed' with the cause instead of waiting forever."""
    h = Harness(tmp_path / "store", tmp_path / "jobs.sqlite", engine="torch")
    rec = h.run(pair(triple, serve=True, name="doomed"))
    assert rec.status == JobStatus.running and rec.stage is not None
    assert rec.stage.value == "load" and rec.result is not None
    (Path(rec.result.output) / "config.json").write_text('{"model_type": "no-such-model"}')

    async def serve_pending() -> JobRecord:
        # a serving replica started after the merge finds the notice in the records; the
        # job plane's load watcher ends the job from the replica's report
        serving = ServingService(h.settings, LoadBoard(h.records.kv))
        serving.start()
        stop = threading.Event()
        watcher = h.runner.loads.start(stop)
        try:
            for _ in range(600):
                got = h.records.get(rec.id)
                if got is not None and got.status.terminal:
                    return got
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            watcher.join()
            await serving.stop()
        raise AssertionError("the load never ended the job")

    assert_failed(asyncio.run(serve_pending()), "load_failed", "load")


# -- pinned refs and in-engine prefixes -------------------------------------------------
def test_pinned_residual_survives_a_prefix_turning_ambiguous(
    triple: TinyTriple, tmp_path: Path
) -> None:
    """Validation pins the full key of a residual prefix; a second pack sharing the prefix
    that appears before the merge does not change what the job uses (in-engine too)."""
    h = Harness(tmp_path / "store", tmp_path / "jobs.sqlite")
    first = h.run(MergeSpec(base=str(triple.base), instruct=str(triple.instruct)))
    assert first.result is not None
    key = first.result.residual_key
    jobs = [
        h.validate(MergeSpec(residual=key[:6], target=str(triple.new_base))),
        h.validate(
            MergeSpec(
                residual=key[:6], target=str(triple.new_base), serve=True, serve_mode="in_engine"
            )
        ),
    ]
    shutil.copytree(h.store / "residuals" / key, h.store / "residuals" / (key[:6] + "0" * 26))
    done, inline = (h.merge(j) for j in jobs)
    assert done.status == JobStatus.succeeded, done.error
    assert done.result is not None and done.result.residual_key == key
    assert inline.status == JobStatus.running and inline.result is not None, inline.error
    entry = h.records.model(inline.result.model_id)
    assert entry is not None and entry.residual_key == key  # a store key, not a path


def test_in_engine_vocabulary_change_is_a_typed_error(
    llama_triple_extra_vocab: TinyTriple, tmp_path: Path
) -> None:
    h = Harness(tmp_path / "store", tmp_path / "jobs.sqlite")
    rec = h.run(pair(llama_triple_extra_vocab, serve=True, serve_mode="in_engine"))
    assert "serve_mode 'checkpoint'" in assert_failed(rec, "incompatible_models")


# -- disk readiness and records on a full disk ------------------------------------------
def test_readyz_reports_low_disk(tmp_path: Path) -> None:
    settings = Settings(models_cache_dir=tmp_path / "store", min_free_disk_gb=1e9)
    with LiveServer(create_app(settings)) as server, server.client() as client:
        error = assert_error(client.get("/readyz"), 503, "service_unavailable")
        assert "low disk" in error["message"] and "REALIGN_MIN_FREE_DISK_GB" in error["message"]
        assert "worker" not in error["message"]  # only the failed check is named
        assert client.get("/healthz").status_code == 200


def test_records_on_a_full_disk_do_not_take_the_api_down(
    llama_triple: TinyTriple, tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Embedded mode keeps its records in the store: fill that disk while a job is
    merging. Reads keep working, /readyz says why it is not ready, a submission gets a
    clear 503 or a job — never a 500 — and once space is freed the merging job and
    every job accepted meanwhile end 'insufficient_storage' (none stays running) and
    new jobs run again."""
    monkeypatch.setenv("REALIGN_MAX_READ_MBPS", "1")  # the merge lasts seconds
    get_settings.cache_clear()
    settings = Settings(
        models_cache_dir=tmpfs, allowed_roots=[llama_triple.base.parent], min_free_disk_gb=0.002
    )
    try:
        with LiveServer(create_app(settings)) as server, server.client() as client:
            _fill_while_merging(client, llama_triple, tmpfs)
    finally:
        monkeypatch.delenv("REALIGN_MAX_READ_MBPS")
        get_settings.cache_clear()
    assert [p for p in stored(tmpfs) if p.startswith(".staging")] == []


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until the disk is full (a merge is writing there too)."""
    with path.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


def _fill_while_merging(client: httpx.Client, llama_triple: TinyTriple, tmpfs: Path) -> None:
    first = client.post("/v1/merges", json=merge_body(llama_triple)).json()["id"]
    assert wait_http(client, first)["status"] == "succeeded"
    merging = client.post("/v1/merges", json=merge_body(llama_triple, alpha=0.75))
    assert merging.status_code == 202, merging.text
    accepted = [merging.json()["id"]]  # at least this one meets the full disk
    end = time.monotonic() + 60
    while client.get(f"/v1/merges/{accepted[0]}").json()["status"] in ("queued", "validating"):
        assert time.monotonic() < end, "the job never started merging"
        time.sleep(0.05)
    _fill(tmpfs / "filler")
    assert client.get(f"/v1/merges/{first}").json()["status"] == "succeeded"
    assert client.get("/v1/merges").status_code == 200
    assert client.get("/healthz").status_code == 200
    assert "low disk" in assert_error(client.get("/readyz"), 503)["message"]
    for alpha in (0.5, 0.25, 0.125):
        response = client.post("/v1/merges", json=merge_body(llama_triple, alpha=alpha))
        assert response.status_code in (202, 503), response.text
        if response.status_code == 503:
            assert "disk" in assert_error(response, 503, "records_unavailable")["message"]
        else:
            accepted.append(response.json()["id"])
    time.sleep(1.0)  # let the worker meet the full disk
    (tmpfs / "filler").unlink()
    for job_id in accepted:
        failed = wait_http(client, job_id, timeout=60)
        assert failed["status"] == "failed", failed
        assert failed["error"]["code"] == "insufficient_storage", failed
    again = client.post("/v1/merges", json=merge_body(llama_triple))  # stored: no write
    assert again.status_code == 202, again.text
    assert wait_http(client, again.json()["id"])["status"] == "succeeded"


# -- deliveries: real Redis, real workers, SIGKILL --------------------------------------
def _running_attempts(svc: JobService, job_id: str) -> list[int]:
    """seq of each 'running' status event (one per delivery that started the merge)."""
    return [
        e.seq
        for e in svc.events(job_id, ALICE)
        if e.kind == "status" and e.status == JobStatus.running and e.stage is not None
        and e.stage.value == "residual"
    ]  # fmt: skip


def _wait_mid_merge(svc: JobService, job_id: str, attempt: int, workers: Workers) -> None:
    """Until delivery ``attempt`` has written progress (it is merging right now)."""
    end = time.monotonic() + 90
    while time.monotonic() < end:
        starts = _running_attempts(svc, job_id)
        if len(starts) >= attempt:
            events = svc.events(job_id, ALICE, starts[attempt - 1])
            if any(e.kind == "progress" for e in events):
                return
        time.sleep(0.05)
    raise AssertionError(f"delivery {attempt} never started merging\n{workers.logs()}")


@pytest.mark.slow
def test_a_job_fails_after_max_deliveries_sigkilled(
    redis_server: RedisServer, llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    """Each delivery's worker is SIGKILLed mid-merge. After the third the job fails
    'worker_lost' without a fourth run, and the record shows 3 deliveries."""
    env = service_env(
        redis_server.url,
        store_dir,
        [llama_triple.base.parent],
        REALIGN_MAX_READ_MBPS="2",
        REALIGN_JOB_LEASE_S="3",
    )
    settings = Settings(
        redis_url=redis_server.url,
        models_cache_dir=store_dir,
        allowed_roots=[llama_triple.base.parent],
        job_time_limit_s=8,
        visibility_timeout_s=10,
    )
    svc = JobService.from_settings(settings)
    workers = Workers(env, tmp_path)
    try:
        rec, _ = svc.submit(pair(llama_triple), ALICE)
        for attempt in (1, 2, 3):
            proc = workers.start(f"doomed{attempt}")
            _wait_mid_merge(svc, rec.id, attempt, workers)
            assert svc.get(rec.id, ALICE).deliveries == attempt
            workers.kill(proc)
        workers.start("survivor")  # takes the 4th delivery, and reaps
        end = time.monotonic() + 90
        while not (job := svc.get(rec.id, ALICE)).status.terminal:
            assert time.monotonic() < end, workers.logs()
            time.sleep(0.2)
    finally:
        workers.stop_all()
    message = assert_failed(job, "worker_lost")
    assert "delivered 3 times" in message and job.deliveries == 3
    assert len(_running_attempts(svc, rec.id)) == 3  # no fourth run
    assert list(store_dir.glob("merged/*")) == []
    body = json.loads(job.model_dump_json())
    assert body["deliveries"] == 3


def test_the_api_shows_deliveries(llama_triple: TinyTriple, tmp_path: Path) -> None:
    settings = Settings(
        models_cache_dir=tmp_path / "store", allowed_roots=[llama_triple.base.parent]
    )
    with LiveServer(create_app(settings)) as server, server.client() as client:
        job = wait_http(
            client, client.post("/v1/merges", json=merge_body(llama_triple)).json()["id"]
        )
        assert job["status"] == "succeeded" and job["deliveries"] == 1
        assert client.get("/v1/merges").json()["data"][0]["deliveries"] == 1


def test_redis_down_answers_503_not_500(redis_server: RedisServer, tmp_path: Path) -> None:
    """Records unreachable: job reads and writes answer 503 'records_unavailable',
    /readyz names Redis, liveness stays up."""
    settings = Settings(redis_url=redis_server.url, models_cache_dir=tmp_path / "store")
    with LiveServer(create_app(settings)) as server, server.client() as client:
        assert client.get("/v1/merges").status_code == 200
        redis_server.stop()
        for response in (client.get("/v1/merges"), client.get("/v1/merges/mrg_x")):
            assert "Redis" in assert_error(response, 503, "records_unavailable")["message"]
        assert "Redis" in assert_error(client.get("/readyz"), 503)["message"]
        assert client.get("/healthz").status_code == 200
        redis_server.start()


@pytest.mark.parametrize(
    ("err", "code", "words"),
    [
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "insufficient_storage", "quota"),
        (OSError(errno.EROFS, "Read-only file system", "/s/x"), "output_not_writable", "/s/x"),
        (KeyError("secret-token"), "internal_error", "KeyError"),
    ],
)
def test_error_mapping(err: Exception, code: str, words: str, tmp_path: Path) -> None:
    error = job_error(err, JobStage.apply, tmp_path, "mrg_1")
    assert error.code == code and words in error.message and "'apply'" in error.message
    assert "secret-token" not in error.message  # the text of unexpected errors stays in logs
