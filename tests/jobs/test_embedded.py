"""The job service in embedded mode (SQLite records, in-process worker): same API."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from app.core.errors import (
    InvalidRefError,
    JobNotFoundError,
    JobStateError,
    ModelNotFoundError,
    PathNotAllowedError,
)
from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from app.jobs.follow import LOCAL, LocalJobs
from app.jobs.models import Caller, JobRecord, JobStatus, MergeSpec
from app.jobs.service import JobService
from tests.helpers import stored

ALICE, BOB, ADMIN = Caller(name="alice"), Caller(name="bob"), Caller(name="ops", role="admin")


@pytest.fixture
def service(
    llama_triple: TinyTriple, qwen_triple: TinyTriple, store_dir: Path
) -> Iterator[JobService]:
    roots = [llama_triple.base.parent, qwen_triple.base.parent]
    svc = JobService.from_settings(Settings(models_cache_dir=store_dir, allowed_roots=roots))
    svc.start()
    yield svc
    svc.stop()


def spec(t: TinyTriple, **kw: object) -> MergeSpec:
    return MergeSpec(base=str(t.base), instruct=str(t.instruct), target=str(t.new_base), **kw)  # type: ignore[arg-type]


def wait(svc: JobService, job_id: str, caller: Caller = ALICE, timeout: float = 60) -> JobRecord:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rec = svc.get(job_id, caller)
        if rec.status.terminal:
            return rec
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {rec.status} after {timeout} s")


def test_submit_poll_succeeded(service: JobService, llama_triple: TinyTriple) -> None:
    rec, created = service.submit(spec(llama_triple, name="news-instruct"), ALICE)
    assert created and rec.status == JobStatus.queued
    done = wait(service, rec.id)
    assert done.status == JobStatus.succeeded, done.error
    assert done.result is not None and done.result.model_id == "news-instruct"
    AutoModelForCausalLM.from_pretrained(done.result.output)
    kinds = [e.kind for e in service.events(rec.id, ALICE)]
    assert "progress" in kinds and kinds[-1] == "status"
    stages = {e.stage for e in service.events(rec.id, ALICE)}
    # first merge of the pair: residual and model in one pass, reported as "residual"
    assert {"preflight", "residual", "publish"} <= {s.value for s in stages if s}
    assert done.progress.percent == 100.0
    assert [m.id for m in service.models()] == ["news-instruct"]
    assert service.metrics()["jobs_by_status"]["succeeded"] == 1


def test_a_ties_job_records_the_lineage(service: JobService, llama_triple: TinyTriple) -> None:
    """A job merging by ties checks the lineage at validation (a 'lineage:' event) and
    its result carries the figures, as a task-arithmetic job's does."""
    rec, _ = service.submit(spec(llama_triple, method="ties", params={"density": 0.5}), ALICE)
    done = wait(service, rec.id)
    assert done.status == JobStatus.succeeded, done.error
    assert done.result is not None and done.result.lineage is not None
    assert done.result.lineage.passed and "target-base" in done.result.lineage.distances
    assert done.result.manifest["lineage"] == done.result.lineage.model_dump(mode="json")
    events = [e.message for e in service.events(rec.id, ALICE)]
    assert any(m.startswith("lineage: instruct-base") for m in events), events


def test_duplicate_and_idempotent_submissions_share_one_job(
    service: JobService, llama_triple: TinyTriple
) -> None:
    first, created = service.submit(spec(llama_triple), ALICE, idempotency_key="k1")
    again, created_again = service.submit(spec(llama_triple), ALICE)
    same_key, created_key = service.submit(spec(llama_triple), ALICE, idempotency_key="k1")
    assert created and not created_again and not created_key
    assert first.id == again.id == same_key.id
    with pytest.raises(JobStateError, match="different request body"):
        service.submit(spec(llama_triple, alpha=0.5), ALICE, idempotency_key="k1")
    wait(service, first.id)
    assert service.list(ALICE)[1] == 1


def test_users_see_only_their_jobs(service: JobService, llama_triple: TinyTriple) -> None:
    rec, _ = service.submit(spec(llama_triple), ALICE)
    with pytest.raises(JobNotFoundError):
        service.get(rec.id, BOB)
    assert service.get(rec.id, ADMIN).id == rec.id
    assert service.list(BOB) == ([], 0)
    assert service.list(ADMIN, all_callers=True)[1] == 1
    with pytest.raises(JobNotFoundError):
        service.get("mrg_nope", ADMIN)
    wait(service, rec.id)


def test_bad_refs_are_refused_before_queueing(
    service: JobService, llama_triple: TinyTriple, tmp_path: Path, store_dir: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    link = llama_triple.base.parent / "escape"
    if not link.exists():
        os.symlink(outside, link)
    traversal = f"{llama_triple.base.parent}/../../../etc"
    for bad, error in [
        (spec(llama_triple).model_copy(update={"target": traversal}), PathNotAllowedError),
        (spec(llama_triple).model_copy(update={"target": str(link)}), PathNotAllowedError),
        (spec(llama_triple).model_copy(update={"instruct": "gs://bucket/x"}), InvalidRefError),
        (spec(llama_triple).model_copy(update={"base": None}), InvalidRefError),
        (
            spec(llama_triple).model_copy(update={"target": str(llama_triple.base) + "x"}),
            ModelNotFoundError,
        ),
    ]:
        with pytest.raises(error):
            service.submit(bad, ALICE)
    assert service.list(ADMIN, all_callers=True)[1] == 0
    assert stored(store_dir) == []


def test_cross_family_fails_in_preflight(
    service: JobService, llama_triple: TinyTriple, qwen_triple: TinyTriple, store_dir: Path
) -> None:
    bad = spec(llama_triple).model_copy(update={"instruct": str(qwen_triple.instruct)})
    rec, _ = service.submit(bad, ALICE)
    done = wait(service, rec.id)
    assert done.status == JobStatus.failed and done.error is not None
    assert done.error.code == "incompatible_models"
    assert "model_type 'qwen2' vs 'llama'" in done.error.message
    assert done.stage is not None and done.stage.value == "preflight"
    assert stored(store_dir) == []


def test_cancel_mid_run_leaves_nothing(
    llama_triple: TinyTriple, qwen_triple: TinyTriple, store_dir: Path
) -> None:
    # The read rate comes from the service's Settings, not the environment: they flow
    # down to the merge.
    roots = [llama_triple.base.parent, qwen_triple.base.parent]
    settings = Settings(models_cache_dir=store_dir, allowed_roots=roots, max_read_mbps=2)
    service = JobService.from_settings(settings)
    service.start()
    try:
        rec, _ = service.submit(spec(llama_triple), ALICE)
        while service.get(rec.id, ALICE).progress.bytes_done == 0:
            time.sleep(0.02)
        service.cancel(rec.id, ALICE)
        done = wait(service, rec.id)
    finally:
        service.stop()
    assert done.status == JobStatus.cancelled
    assert stored(store_dir) == []
    with pytest.raises(JobStateError):
        service.cancel(rec.id, ALICE)


def test_residual_only_job_then_apply_by_key(service: JobService, llama_triple: TinyTriple) -> None:
    t = llama_triple
    rec, _ = service.submit(MergeSpec(base=str(t.base), instruct=str(t.instruct)), ALICE)
    done = wait(service, rec.id)
    assert done.status == JobStatus.succeeded and done.result is not None
    key = done.result.residual_key
    assert service.residual(key[:8])["key"] == key
    rec2, _ = service.submit(MergeSpec(residual=key, target=str(t.new_base)), ALICE)
    assert wait(service, rec2.id).status == JobStatus.succeeded
    with pytest.raises(Exception, match="no residual"):
        service.submit(MergeSpec(residual="ffffffff", target=str(t.new_base)), ALICE)


def test_records_survive_a_restart(llama_triple: TinyTriple, store_dir: Path) -> None:
    settings = Settings(models_cache_dir=store_dir, allowed_roots=[llama_triple.base.parent])
    svc = JobService.from_settings(settings)
    svc.start()
    rec, _ = svc.submit(spec(llama_triple), ALICE)
    wait(svc, rec.id)
    svc.stop()
    again = JobService.from_settings(settings)
    assert again.get(rec.id, ALICE).status == JobStatus.succeeded
    ready, detail = again.readiness()  # no worker: still ready, jobs queue
    assert ready and "no worker is alive" in detail


def test_a_command_line_worker_runs_only_its_own_jobs(
    llama_triple: TinyTriple, store_dir: Path
) -> None:
    """`realign sweep`'s in-process service shares the store's records with a server: it
    takes none of the server's queued jobs, which a restarted server still runs."""
    settings = Settings(models_cache_dir=store_dir, allowed_roots=[llama_triple.base.parent])
    server = JobService.in_process(settings)  # not started: its job waits, queued
    theirs, _ = server.submit(spec(llama_triple, alpha=0.3), ALICE)
    cli = JobService.in_process(settings, adopt=False)
    cli.start()
    try:
        mine, _ = cli.submit(spec(llama_triple, alpha=0.6), ALICE)
        assert wait(cli, mine.id).status == JobStatus.succeeded
        time.sleep(0.5)
        assert cli.get(theirs.id, ALICE).status == JobStatus.queued
        assert cli.get(theirs.id, ALICE).deliveries == 0
    finally:
        cli.stop()
    restarted = JobService.in_process(settings)
    restarted.start()
    try:
        assert wait(restarted, theirs.id).status == JobStatus.succeeded
    finally:
        restarted.stop()


def test_a_command_line_run_takes_on_the_job_an_earlier_one_left(
    llama_triple: TinyTriple, store_dir: Path
) -> None:
    """A command killed after submitting leaves its job unfinished in the store's records;
    the same command run again finds that job (an identical one in flight) and, with no
    live worker on it, runs it itself instead of following it for ever."""
    settings = Settings(models_cache_dir=store_dir, allowed_roots=[llama_triple.base.parent])
    earlier = JobService.in_process(settings, adopt=False)  # never started: as if killed
    left, created = earlier.submit(spec(llama_triple, alpha=0.45), LOCAL)
    assert created
    with LocalJobs(settings) as jobs:
        rec, created = jobs.submit(spec(llama_triple, alpha=0.45))
        assert (rec.id, created) == (left.id, False)
        done = jobs.wait(rec.id, lambda event: None)
    assert done.status == JobStatus.succeeded, done.error
    assert done.deliveries == 1
